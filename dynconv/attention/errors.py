"""The error of the `attn` config group."""

from __future__ import annotations

from dynconv.conversion.operator import OperatorConfigError


class AttentionConfigError(OperatorConfigError):
    """An `attn.*` setting that is invalid, or an add-on the chosen backbone has no place for.

    A kind of OperatorConfigError, so config validation, which builds the model on the meta device and
    turns OperatorConfigError into ConfigError, reports it the same way before a run writes anything."""
