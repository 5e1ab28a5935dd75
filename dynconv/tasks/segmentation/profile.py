"""Parameters and MACs of a segmentation network (backbone + head) at a given input size, beside its backbone's
classification counts.

DyNet Table 3 gives the whole dilated FCN's GFLOPs on Cityscapes without the input size: counted here, ResNet50's
dilated FCN (output stride 8, torchvision's FCN head, 19 classes) is 311.3 GMACs at 768 x 768, Fu et al. (2018)'s
Cityscapes training crop, against the paper's 310.8 (0.2% apart; 276.7 G at 512 x 1024, 1106.9 G at the full
1024 x 2048). The same count for Dy-ResNet50 is 79.1 G against the paper's 95.6: see the dynet_t3 table's note.
The auxiliary head is left out (it only runs in training).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from dynconv.build import build_backbone
from dynconv.profiling import count_macs, count_params

DEFAULT_SIDE = 768  # Fu et al.'s Cityscapes crop: the size at which DyNet Table 3's 310.8 GFLOPs are reproduced


def profile_segmenter(task_class, cfg: DictConfig, side: int, num_classes: int) -> dict[str, Any]:
    op_cfg = OmegaConf.to_container(cfg.op, resolve=True)
    classification_cfg = OmegaConf.merge(cfg.backbone, {"output_stride": 32}) if "output_stride" in cfg.backbone \
        else cfg.backbone
    classification = build_backbone(classification_cfg, op_cfg, cfg.attn, num_classes=1000, image_size=224)
    default_resolution = int(cfg.backbone.get("default_resolution", 224))
    built = build_backbone(cfg.backbone, op_cfg, cfg.attn, num_classes=num_classes, image_size=side)
    task = task_class(OmegaConf.merge(cfg.task, {"aux_loss": False}), cfg.recipe, num_classes)
    model = task.build_model(built.backbone).eval()
    macs = count_macs(model, (3, side, side), depth=2)
    # The backbone runs through forward_features, not its own forward, so the counter does not attribute it.
    by_part = {"backbone": macs.total - sum(macs.by_module.values()), **macs.by_module}
    return {
        "params": count_params(model),
        "macs": macs.total,
        "macs_by_part": by_part,
        "backbone_params": count_params(classification.backbone),
        "backbone_macs": count_macs(classification.backbone, (3, default_resolution, default_resolution)).total,
        "backbone_resolution": default_resolution,
        "input_size": [3, side, side],
        "num_classes": num_classes,
        "output_stride": built.backbone.output_stride,
        "decisions": built.decisions,
        "summary": built.summary(),
    }


def profile_report(task_class, cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """scripts/profile.py task=segmentation: the network at `profile.resolution` (default 768) with
    `profile.num_classes` classes (19 for Cityscapes, 21 for VOC), and the backbone's ImageNet counts."""
    side = int(cfg.profile.resolution or DEFAULT_SIDE)
    classes = int(cfg.profile.num_classes)
    counts = profile_segmenter(task_class, cfg, side, classes)
    lines = [counts.pop("summary")]
    decisions = counts.pop("decisions")
    lines.append(f"{cfg.task.head} segmentation on a {side}x{side} image, {classes} classes, "
                 f"output stride {counts['output_stride']}")
    lines.append(f"params           {counts['params']:>17,}  ({counts['params'] / 1e6:.2f}M)")
    lines.append(f"MACs             {counts['macs']:>17,}  ({counts['macs'] / 1e9:.1f}G)")
    for name, count in sorted(counts.pop("macs_by_part").items(), key=lambda item: -item[1]):
        lines.append(f"  {name:30s} {count / 1e9:10.2f}G MACs")
    lines.append(f"backbone alone (ImageNet classifier, not dilated, {counts['backbone_resolution']} px): "
                 f"{counts['backbone_params']:,} params, {counts['backbone_macs'] / 1e6:.1f}M MACs")
    record = {**counts, "task": cfg.task.name, "head": cfg.task.head, "backbone": cfg.backbone.name,
              "op": cfg.op.name, "attn": cfg.attn.name, "converted_layers": sum(d.converted for d in decisions)}
    return "\n".join(lines), record
