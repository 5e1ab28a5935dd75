"""Parameters and MACs of a backbone x operator x attention, as the papers count them.

    python scripts/profile.py backbone=resnet18 op=condconv op.experts=8

Prints a readable summary, then, as the last stdout line, one JSON object:
{"params": int, "params_inference": int, "macs": int, "macs_inference": int, "input_size": [3, H, W], ...}
(`*_inference`: after `fold_for_inference`, e.g. Weight Excitation folded into plain convolutions).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.cli import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)

from omegaconf import OmegaConf  # noqa: E402



def profile_detection(cfg, task_class) -> int:
    """task=retinanet|maskrcnn: the detector at `profile.resolution` (default 600, WeightNet's scale; the
    KernelWarehouse Mask R-CNN recipe tests at 800), and its backbone's classification counts beside it."""
    from dynconv.detection.profile import profile_detector

    resolution = int(cfg.profile.resolution or 600)
    counts = profile_detector(task_class, cfg, resolution)
    print(counts.pop("summary"))
    decisions = counts.pop("decisions")
    print(f"detector {cfg.task.name} on a {resolution}x{resolution} image, {counts['num_classes']} classes")
    print(f"params           {counts['params']:>15,}  ({counts['params'] / 1e6:.2f}M)")
    print(f"MACs             {counts['macs']:>15,}  ({counts['macs'] / 1e9:.3f}G)")
    for name, count in sorted(counts.pop("macs_by_part").items(), key=lambda item: -item[1]):
        print(f"  {name:30s} {count / 1e6:10.2f}M MACs")
    print(f"backbone + FPN   {counts['features_macs']:>15,}  ({counts['features_macs'] / 1e9:.3f}G)")
    print(f"backbone alone (ImageNet classifier, {counts['backbone_resolution']} px): "
          f"{counts['backbone_params']:,} params ({counts['backbone_params'] / 1e6:.2f}M), "
          f"{counts['backbone_macs']:,} MACs ({counts['backbone_macs'] / 1e6:.1f}M)")
    print(json.dumps({**counts, "task": cfg.task.name, "backbone": cfg.backbone.name, "op": cfg.op.name,
                      "attn": cfg.attn.name, "converted_layers": sum(d.converted for d in decisions)}))
    return 0


def main(argv: list[str]) -> int:
    cfg = compose_or_exit("profile", argv, validate="model")
    from dynconv.build import build_backbone
    from dynconv.profiling import count_macs, count_params, fold_for_inference

    from dynconv.tasks import TASKS

    from dynconv.tasks.detection import DetectionTask

    task_class = TASKS.get(cfg.task.name)
    if issubclass(task_class, DetectionTask):
        return profile_detection(cfg, task_class)
    resolution = cfg.profile.resolution or cfg.backbone.default_resolution
    built = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn,
                           num_classes=cfg.profile.num_classes, image_size=resolution)
    model = built.backbone
    input_size = (3, resolution, resolution)
    params = count_params(model)
    folded = fold_for_inference(model)
    params_inference = count_params(folded)
    macs = count_macs(model, input_size)
    macs_inference = count_macs(folded, input_size).total  # training-only reparameterisations (WE) folded away

    print(built.summary())
    if cfg.profile.layers:
        for decision in built.decisions:
            state = "converted" if decision.converted else f"static: {decision.reason}"
            print(f"  {decision.layer.name:40s} {decision.layer.shape_str():45s} {state}")
    print(f"input            {input_size}")
    print(f"params           {params:>15,}  ({params / 1e6:.2f}M)")
    print(f"params_inference {params_inference:>15,}  ({params_inference / 1e6:.2f}M)")
    print(f"MACs             {macs.total:>15,}  ({macs.total / 1e9:.3f}G)")
    print(f"MACs_inference   {macs_inference:>15,}  ({macs_inference / 1e9:.3f}G)")
    for name, count in sorted(macs.by_module.items(), key=lambda item: -item[1])[:8]:
        print(f"  {name:30s} {count / 1e6:10.2f}M MACs")
    print(json.dumps({
        "params": params,
        "params_inference": params_inference,
        "macs": macs.total,
        "macs_inference": macs_inference,
        "input_size": list(input_size),
        "backbone": cfg.backbone.name,
        "op": built.operator.describe(),
        "attn": cfg.attn.name,
        "converted_layers": sum(d.converted for d in built.decisions),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
