"""`show measure=true`: the CPU latency columns (DyNet Table 2) measured on this machine.

Each row's network and its baseline row's are built for real (224 px, 1000 classes, eval mode, training-only
reparameterisations folded) and timed at batch 1 interleaved (dynconv/benchmark.py): absolute milliseconds
depend on the machine, so the comparison with the paper is the ratio to the baseline row, which both measure.
"""

from __future__ import annotations

import torch

from dynconv.reproduction.counting import compose_row, composer, counting_size
from dynconv.reproduction.tables import Table


def _model(cfg):
    from omegaconf import OmegaConf

    from dynconv.benchmark import inference_model
    from dynconv.build import build_backbone

    classes, side = counting_size(cfg)
    built = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn,
                           num_classes=classes, image_size=side)
    model, _ = inference_model(built.backbone.eval())
    return model, side


def measure_latency(table: Table, repeats: int = 7, warmup: int = 3, steps: int = 5) -> dict[str, float]:
    """row id -> median milliseconds per image at batch 1, for every buildable row of a table with a
    cpu_latency column (and the baseline rows they refer to)."""
    from dynconv.benchmark import inference_step, interleaved

    if not any(column.kind == "cpu_latency" for column in table.columns):
        return {}
    rows = [row for row in table.rows if row.buildable]
    candidates = {}
    with composer() as compose:
        for row in rows:
            model, side = _model(compose_row(compose, table, row))
            candidates[row.id] = {"infer": inference_step(model, torch.randn(1, 3, side, side))}
    timed = interleaved(candidates, device=torch.device("cpu"), repeats=repeats, warmup=warmup, steps=steps)
    return {row_id: timings["infer"].ms for row_id, timings in timed.items()}
