"""The papers' figures (docs/figures.md): `scripts/figures.py figure=<id>` draws them from checkpoints, collected runs
and measurements. Each figure module registers its ids with `registry.figure`; importing this package loads them."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Sequence

from dynconv.figures.registry import FIGURES, FigureSpec, MissingInput, figure, figure_ids

# Figure modules, imported for their registrations (one module per family of figures).
from dynconv.figures import kw_heatmaps  # noqa: E402,F401
from dynconv.figures import dynet_figures  # noqa: E402,F401
from dynconv.figures import tradeoff  # noqa: E402,F401
from dynconv.figures import wn_kernels  # noqa: E402,F401
from dynconv.figures import we_figures  # noqa: E402,F401

__all__ = ["FIGURES", "FigureSpec", "MissingInput", "figure", "figure_ids", "make_figures"]


def make_figures(cfg, ids: Sequence[str]) -> dict[str, Any]:
    """Make the figures `ids`; {"out", "figures": {id: summary with "files"}, "missing": {id: reason},
    "failed": {id: error}}. One figure's missing input or failure does not stop the others."""
    import torch

    from dynconv.figures.context import FigureContext

    out_dir = Path(str(cfg.out))
    ctx = FigureContext(cfg, out_dir)
    report: dict[str, Any] = {"out": str(out_dir), "figures": {}, "missing": {}, "failed": {}}
    for key in ids:
        torch.manual_seed(int(cfg.seed))
        before = len(ctx.written)
        try:
            summary = FIGURES[key].make(ctx) or {}
        except MissingInput as missing:
            report["missing"][key] = str(missing)
            continue
        except Exception as error:  # one figure's failure is reported; the others are still drawn
            traceback.print_exc()
            report["failed"][key] = f"{type(error).__name__}: {error}"
            continue
        report["figures"][key] = {"files": ctx.written[before:], **summary}
    return report
