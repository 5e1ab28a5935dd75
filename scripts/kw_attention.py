"""Mean learnt KernelWarehouse attentions per warehouse over the evaluation split (KernelWarehouse, Figure 3).

    python scripts/kw_attention.py checkpoint=outputs/<run>/checkpoints/best.pt out=outputs/<run>/kw_attention
    torchrun --standalone --nproc_per_node=8 scripts/kw_attention.py checkpoint=... data.root=/imagenet

The model is rebuilt from the config stored in the checkpoint, exactly as eval.py does (same keys: weights,
device, data.*, recipe.eval_batch_size), and the validation split is run through it in eval mode with
`dynconv.analysis.kw_attention.AttentionRecorder` hooked on every KernelWarehouse layer. Writes `<out>.pt`
({"warehouses": {key: {"alpha": (m_t, n) mean alpha, "layers": [...]}}, "metadata": {...}}) and `<out>.json`
(the summary), then prints, as the last stdout line, one JSON object: {"output": "<out>.pt", "warehouses":
{key: {"mixtures": m_t, "cells": n, "diagonal_fraction": ...}}, "images": N, "top1": ..., "checkpoint": ...}.
A model without KernelWarehouse layers (op other than kw) is refused with exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from dynconv.config import ConfigError  # noqa: E402


def output_path(out: str) -> Path:
    """`<out>.pt` (an explicit .pt suffix is kept as is)."""
    path = Path(str(out))
    return path if path.suffix == ".pt" else path.with_name(path.name + ".pt")


def export(cfg: DictConfig) -> dict:
    from dynconv.engine.evaluation_run import load_for_evaluation
    from dynconv.analysis.kw_attention import AttentionRecorder, kw_layers, save_attention_stats, summarize

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint is required: checkpoint=outputs/<run>/checkpoints/best.pt")
    if not cfg.out:
        raise ConfigError("out is required: the output path without suffix (writes <out>.pt and <out>.json)")

    def require_kw(run_cfg: DictConfig) -> None:
        if run_cfg.op.name != "kw":
            raise ConfigError(f"{cfg.checkpoint} was trained with op.name={run_cfg.op.name!r}, which has no "
                              "KernelWarehouse layers: kw_attention needs a checkpoint trained with op=kw")

    loaded = load_for_evaluation(cfg, require_kw)
    payload, run_cfg, dist, data, task, model = (loaded.payload, loaded.run_cfg, loaded.dist, loaded.data,
                                                 loaded.task, loaded.model)
    if not kw_layers(model):
        raise ConfigError(f"op.name={run_cfg.op.name!r}: the model of {cfg.checkpoint} has no KernelWarehouse "
                          "layers (every layer stayed static: see op.keep_static and the layout)")

    model.eval()
    with AttentionRecorder(model) as recorder:
        metrics = task.evaluate(model, data.val_loader, dist.device, contextlib.nullcontext)  # eval mode, no_grad
    recorder.all_reduce()
    stats = recorder.mean_by_warehouse()
    path = output_path(cfg.out)
    metadata = {"checkpoint": str(cfg.checkpoint), "weights": cfg.weights, "epoch": payload.get("epoch"),
                "images": recorder.samples, "top1": metrics["top1"], "backbone": run_cfg.backbone.name,
                "op": OmegaConf.to_container(run_cfg.op, resolve=True)}
    if dist.is_main:
        save_attention_stats(stats, path, metadata)
    return {"output": str(path), "warehouses": summarize(stats), "images": recorder.samples,
            "top1": metrics["top1"], "checkpoint": str(cfg.checkpoint)}


def config(argv: list[str]):
    """The composed, validated config of these command-line arguments (exit 2 on a bad one); nothing runs.
    tests/test_docs_commands.py composes every documented command of this script through it."""
    return compose_or_exit("kw_attention", argv, validate="none")


def main(argv: list[str]) -> int:
    cfg = config(argv)
    from dynconv.engine.checkpoint import CorruptCheckpointError
    from dynconv.engine.distributed import cleanup_distributed

    try:
        result = export(cfg)
    except (ConfigError, CorruptCheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
