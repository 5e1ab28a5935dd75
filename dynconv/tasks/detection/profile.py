"""Parameters and MACs of a detector next to its backbone's, the way the detection tables report them.

WeightNet Table 5 lists, beside RetinaNet's mAP, the backbone's ImageNet parameters and FLOPs (ShuffleNetV2 0.5x:
1.4M, 41M at 224 px, classifier included); the detector's own cost at the detection scale is what a user budgets.
`profile_detector` gives both:

- `params`, `macs`: the whole detector (FPN, heads, 80 COCO classes + background) on one `resolution` x
  `resolution` image (padded to a multiple of 32 by the detector's transform, as at test time), eval mode;
- `backbone_params`, `backbone_macs`: the classification network the detector's backbone comes from, with its
  ImageNet classifier, at its own default resolution (the tables' columns);
- `features_macs`: backbone + FPN alone at the detection resolution (the part that does not depend on how many
  boxes survive).

Mask R-CNN's RoI heads run on the proposals and detections the model keeps, so its `macs` depend on the image
and the weights (an untrained model on a blank image keeps few); RetinaNet's heads are dense and its `macs` are
exact.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dynconv.build import build_backbone
from dynconv.profiling import count_macs, count_params

COCO_CLASSES = 80


def detection_input_spec(resolution: int, max_size: int | None = None) -> SimpleNamespace:
    """What the detector's transform needs from a DetectionData, for a square `resolution` image kept as is."""
    return SimpleNamespace(train_sizes=[resolution], test_size=resolution, max_size=max_size or 2 * resolution,
                           mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def profile_detector(task_class, cfg: DictConfig, resolution: int, num_classes: int = COCO_CLASSES) -> dict[str, Any]:
    op_cfg = OmegaConf.to_container(cfg.op, resolve=True)
    classification = build_backbone(cfg.backbone, op_cfg, cfg.attn, num_classes=1000, image_size=224)
    default_resolution = int(cfg.backbone.get("default_resolution", 224))
    backbone_params = count_params(classification.backbone)
    backbone_macs = count_macs(classification.backbone, (3, default_resolution, default_resolution)).total

    built = build_backbone(cfg.backbone, op_cfg, cfg.attn, num_classes=1000, image_size=resolution)
    # Counted unfrozen: frozen stages have requires_grad=False and frozen BN keeps its affine as buffers, and the
    # tables count a model's parameters whether or not fine-tuning updates them.
    task_cfg = OmegaConf.merge(cfg.task, {"frozen_bn": False, "frozen_stages": -1})
    task = task_class(task_cfg, cfg.recipe, num_classes, detection_input_spec(resolution))
    model = task.build_model(built.backbone).eval()
    macs = count_macs(model, (3, resolution, resolution), depth=2)
    padded = -(-resolution // 32) * 32
    features = count_macs(model.backbone, (3, padded, padded), depth=2).total
    return {
        "params": count_params(model),
        "macs": macs.total,
        "features_macs": features,
        "macs_by_part": macs.by_module,
        "backbone_params": backbone_params,
        "backbone_macs": backbone_macs,
        "backbone_resolution": default_resolution,
        "input_size": [3, resolution, resolution],
        "num_classes": num_classes,
        "decisions": built.decisions,
        "summary": built.summary(),
    }


def profile_report(task_class, cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """scripts/profile.py for task=retinanet|maskrcnn: the detector at `profile.resolution` (default 600,
    WeightNet's scale; the KernelWarehouse Mask R-CNN recipe tests at 800), and its backbone's classification
    counts beside it. Returns (readable text, the JSON record)."""
    resolution = int(cfg.profile.resolution or 600)
    counts = profile_detector(task_class, cfg, resolution)
    lines = [counts.pop("summary")]
    decisions = counts.pop("decisions")
    lines.append(f"detector {cfg.task.name} on a {resolution}x{resolution} image, {counts['num_classes']} classes")
    lines.append(f"params           {counts['params']:>15,}  ({counts['params'] / 1e6:.2f}M)")
    lines.append(f"MACs             {counts['macs']:>15,}  ({counts['macs'] / 1e9:.3f}G)")
    for name, count in sorted(counts.pop("macs_by_part").items(), key=lambda item: -item[1]):
        lines.append(f"  {name:30s} {count / 1e6:10.2f}M MACs")
    lines.append(f"backbone + FPN   {counts['features_macs']:>15,}  ({counts['features_macs'] / 1e9:.3f}G)")
    lines.append(f"backbone alone (ImageNet classifier, {counts['backbone_resolution']} px): "
                 f"{counts['backbone_params']:,} params ({counts['backbone_params'] / 1e6:.2f}M), "
                 f"{counts['backbone_macs']:,} MACs ({counts['backbone_macs'] / 1e6:.1f}M)")
    record = {**counts, "task": cfg.task.name, "backbone": cfg.backbone.name, "op": cfg.op.name,
              "attn": cfg.attn.name, "converted_layers": sum(d.converted for d in decisions)}
    return "\n".join(lines), record
