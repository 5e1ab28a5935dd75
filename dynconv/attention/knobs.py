"""Reading an add-on's `attn.*` knobs: every bad value is an error naming `attn.<key>`, the value and what is
allowed, raised before the add-on touches the backbone (the operators' `op.*` checks, for the `attn` group)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from dynconv.ops.base import OperatorConfigError


class AttentionConfigError(OperatorConfigError):
    """An `attn.*` setting that is invalid, or an add-on the chosen backbone has no place for.

    A kind of OperatorConfigError, so config validation, which builds the model on the meta device and
    turns OperatorConfigError into ConfigError, reports it the same way before a run writes anything."""


def _fail(name: str, key: str, value: Any, allowed: str) -> AttentionConfigError:
    return AttentionConfigError(f"attn.{key}={value!r} is invalid for attn={name}: allowed values are {allowed}")


def reject_unknown_keys(cfg: Mapping[str, Any], name: str, knobs: tuple[str, ...]) -> None:
    """A typo (`attn.reducton`) would otherwise be ignored silently when the config is a plain dict."""
    unknown = sorted(set(cfg) - {"name", *knobs})
    if unknown:
        raise AttentionConfigError(
            f"attn.{unknown[0]} is not a knob of attn={name}; its knobs are: {', '.join(knobs) or '(none)'}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(cfg: Mapping[str, Any], key: str, name: str) -> int:
    value = cfg.get(key)
    if not _is_int(value) or value < 1:
        raise _fail(name, key, value, "integers >= 1")
    return value


def odd_positive_int(cfg: Mapping[str, Any], key: str, name: str, *, nullable: bool = False) -> int | None:
    """An odd kernel size keeps the map's size with symmetric padding (k - 1) / 2; `null` where allowed."""
    value = cfg.get(key)
    if value is None and nullable:
        return None
    if not _is_int(value) or value < 1 or value % 2 == 0:
        raise _fail(name, key, value, "odd integers >= 1" + (" or null" if nullable else ""))
    return value


def finite_number(cfg: Mapping[str, Any], key: str, name: str, *, positive: bool = False) -> float:
    value = cfg.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise _fail(name, key, value, "finite numbers > 0" if positive else "finite numbers")
    return float(value)
