"""`log.figures=true`: two of the papers' figures in TensorBoard at every evaluation (docs/training.md).

- `figures/kw_attention` (op=kw models): KernelWarehouse's Figure 3, the mean learnt attention alpha_ij per
  warehouse over the validation split (`dynconv.analysis.kw_attention.AttentionRecorder`,
  `dynconv.figures.kw_heatmaps.heatmap_figure`), as an image.
- `figures/feature_correlation` (every model): DyNet's Figures 2 and 6, the Pearson correlations between the
  last stage's feature maps over the validation split, every pair of channels once
  (`dynconv.analysis.feature_correlation`), as a histogram.

The recorders are attached only around the evaluation of the trained model (`trainer.evaluate(trainer.model)`,
not the EMA copy, never a training step): the hook wraps `trainer.evaluate` from `before_train` to `close`, so the
statistics come from the evaluation's own forward passes, at no extra pass over the data (the per-batch work is a
C x C float64 product: evaluations get slower). Under DDP every rank records its shard of the validation split and
the statistics are summed over the ranks (`all_reduce`) before rank 0, the only one given a writer, logs them at
step epoch + 1 (as the `val/*` scalars).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

from dynconv.engine.hooks.base import Hook

log = logging.getLogger("dynconv")


class FigureLoggingHook(Hook):
    def __init__(self, writer=None):
        """`writer`: rank 0's `SummaryWriter` (the TensorBoard hook's); None on the other ranks (they record and
        take part in the all_reduce only)."""
        self.writer = writer
        self._layer: tuple[str, int | None] | None = None  # (module name, channels) of the last stage
        self._no_layer = False  # the last stage could not be found (said once, correlation skipped)

    # ---------------------------------------------------------------------------------------------- wiring

    def before_train(self, trainer) -> None:
        original: Callable[[Any], dict[str, float]] = trainer.evaluate

        def evaluate(model):
            if model is not trainer.model:  # the EMA copy (or anything else): evaluated as it is
                return original(model)
            return self.evaluate_recorded(trainer, model, original)

        trainer.evaluate = evaluate  # an instance attribute over the method, removed again in close()

    def close(self, trainer) -> None:
        trainer.__dict__.pop("evaluate", None)

    # ------------------------------------------------------------------------------------------- recording

    def _last_stage(self, model) -> tuple[str, int | None] | None:
        if self._layer is None and not self._no_layer:
            from dynconv.analysis.feature_correlation import last_stage

            try:
                self._layer = last_stage(model)
            except (ValueError, NotImplementedError, RuntimeError, TypeError) as error:
                self._no_layer = True
                log.warning("log.figures: no feature-correlation histogram for this model (%s)", error)
        return self._layer

    def evaluate_recorded(self, trainer, model, evaluate: Callable[[Any], dict[str, float]]) -> dict[str, float]:
        from dynconv.analysis.feature_correlation import FeatureCorrelation, off_diagonal
        from dynconv.analysis.kw_attention import AttentionRecorder, kw_layers

        attention = AttentionRecorder(model) if kw_layers(model) else None
        stage = self._last_stage(model)
        correlation = FeatureCorrelation(model, stage[0], channels=stage[1]) if stage is not None else None
        with contextlib.ExitStack() as active:
            for recorder in (attention, correlation):
                if recorder is not None:
                    active.enter_context(recorder)
            metrics = evaluate(model)
        # Every rank, in the same order: sum the shards' statistics.
        stats = values = None
        if attention is not None:
            attention.all_reduce()
            stats = attention.mean_by_warehouse()
        if correlation is not None:
            correlation.stats.all_reduce(device=trainer.dist.device)
            values = off_diagonal(correlation.correlation())
        if self.writer is not None:
            self._write(trainer.epoch + 1, stats, values)
        return metrics

    def _write(self, step: int, stats, values) -> None:
        if stats is not None:
            from dynconv.figures.kw_heatmaps import heatmap_figure

            self.writer.add_figure("figures/kw_attention", heatmap_figure(stats), step)
        if values is not None and values.size:
            self.writer.add_histogram("figures/feature_correlation", values, step, bins="auto")
        self.writer.flush()
