"""The papers' figures that carry data, by id (`kw_fig3`, `wn_fig5`, ...), and what each needs.

A figure is a function `make(ctx: FigureContext) -> dict` registered with `@figure(...)`. It asks the context for
its inputs (a checkpoint of some operator, collected results, a measurement), computes the figure's data, and
writes a PNG and the data beside it through `ctx.save`. When an input is not there it raises `MissingInput`
naming it; `scripts/figures.py figure=all` then reports that figure as skipped, with the reason, and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


class MissingInput(LookupError):
    """A figure's input (a checkpoint of an operator, collected runs, a TensorBoard log) is not available.
    The message names the input and how to get it."""


@dataclass(frozen=True)
class FigureSpec:
    id: str
    paper: str  # wn | we | kw | dynet
    title: str
    needs: str  # what inputs the figure reads, for `figure=list` and the docs
    make: Callable[[Any], dict[str, Any]]


FIGURES: dict[str, FigureSpec] = {}


def figure(id: str, paper: str, title: str, needs: str):
    """Register a figure function under `id`."""

    def register(make: Callable[[Any], dict[str, Any]]):
        if id in FIGURES:
            raise ValueError(f"figure {id!r} is registered twice")
        FIGURES[id] = FigureSpec(id, paper, title, needs, make)
        return make

    return register


def figure_ids() -> list[str]:
    """Every registered id, grouped by paper in the papers' order."""
    order = {"wn": 0, "we": 1, "kw": 2, "dynet": 3}
    return sorted(FIGURES, key=lambda key: (order.get(FIGURES[key].paper, 9), _number(key), key))


def _number(key: str) -> int:
    digits = "".join(ch for ch in key.split("fig")[-1] if ch.isdigit())
    return int(digits) if digits else 0
