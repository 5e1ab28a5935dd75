"""Segmentation networks: a converted dynconv backbone with dilated last stages and torchvision's heads.

- `head=deeplabv3`: DeepLabV3 (Chen et al. 2017, "Rethinking atrous convolution"), torchvision's `DeepLabHead`
  (ASPP: a 1x1, three 3x3 atrous convolutions and image pooling, 256 channels, then a 3x3 and the classifier) on
  C5. Its atrous rates are (6, 12, 18) at output stride 16 and doubled, (12, 24, 36), at 8 (Chen et al. Sec. 3.3);
  `task.atrous_rates` overrides them. Weight Excitation Table 6's VOC and Cityscapes rows (ResNet50).
- `head=fcn`: the dilated FCN (Long et al. 2015 on a dilated ResNet, the baseline of Fu et al. 2018's DANet and of
  DyNet Table 3): torchvision's `FCNHead`, a 3x3 convolution to C5/4 channels, BN, ReLU, dropout 0.1, a 1x1
  classifier.
- `task.aux_loss=true` adds torchvision's FCN head on C4 as an auxiliary classifier (training only; PSPNet's
  deep supervision, which torchvision's and mmsegmentation's recipes use with weight 0.4-0.5).

Every logit map is upsampled bilinearly to the input size, so the loss and the metric are computed at the
label's resolution. The heads stay static convolutions: both papers put their operator in the backbone
(WE: "all convolution blocks" of the ResNet50; DyNet: Dy-ResNet50 as the base network).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from omegaconf import DictConfig, OmegaConf

from dynconv.backbones import Backbone
from dynconv.backbones.trim import strip_classifier, strip_unused
from dynconv.knobs import Knobs

HEADS = ("deeplabv3", "fcn")
OUTPUT_STRIDES = (8, 16, 32)
# DeepLabV3's ASPP rates at output stride 16 (Chen et al. 2017, Sec. 3.3); they scale with 16 / output_stride.
ASPP_RATES_AT_16 = (6, 12, 18)


def segmentation_knobs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The task's knobs, validated (a ValueError names task.<key> and the allowed values)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    knobs = Knobs(plain, "task")
    values = {
        "head": knobs.choice("head", HEADS),
        "output_stride": knobs.choice("output_stride", OUTPUT_STRIDES),
        "aux_loss": knobs.flag("aux_loss"),
        "aux_weight": knobs.number("aux_weight", 0.0, inclusive=True),
        "eval_mode": knobs.choice("eval_mode", ("whole", "slide")),
    }
    if plain.get("atrous_rates") is None:
        values["atrous_rates"] = tuple(r * 16 // values["output_stride"] for r in ASPP_RATES_AT_16)
    else:
        values["atrous_rates"] = tuple(int(r) for r in knobs.numbers("atrous_rates", length=3, low=1, integers=True))
    for key in ("eval_crop", "eval_stride"):
        values[key] = tuple(int(v) for v in knobs.numbers(key, length=2, low=1, integers=True))
    if any(stride > crop for stride, crop in zip(values["eval_stride"], values["eval_crop"])):
        raise knobs.fail("eval_stride", list(values["eval_stride"]),
                         f"at most task.eval_crop={list(values['eval_crop'])} in each side (windows must overlap or touch)")
    return values


def head_levels(backbone: Backbone) -> tuple[str, str | None]:
    """(the level the head reads, the level the auxiliary head reads): the deepest two feature levels."""
    levels = sorted((f"C{stride.bit_length() - 1}" for stride in backbone.feature_strides),
                    key=lambda level: int(level[1:]))
    if not levels:
        raise ValueError(f"backbone {backbone.name} gives no feature maps; segmentation needs a convolutional "
                         "backbone with multi-scale features (ResNet, MobileNet, ConvNeXt)")
    return levels[-1], (levels[-2] if len(levels) > 1 else None)


def check_output_stride(backbone: Backbone, output_stride: int) -> None:
    """The backbone was built with the task's output stride (the backbone configs take task.output_stride)."""
    if backbone.output_stride != output_stride:
        raise ValueError(
            f"task.output_stride={output_stride} but backbone {backbone.name} was built with output stride "
            f"{backbone.output_stride}: set backbone.output_stride={output_stride} (the backbone configs of the "
            "ResNet, MobileNetV2 and ConvNeXt families follow task.output_stride; other backbones cannot be dilated: "
            "use task.output_stride=32 with them)")


class SegmentationModel(nn.Module):
    """`forward(images) -> {"out": logits (B, K, H, W)[, "aux": logits]}` at the input's resolution."""

    def __init__(self, backbone: Backbone, head: nn.Module, level: str, aux_head: nn.Module | None = None,
                 aux_level: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.level = level
        self.aux_level = aux_level

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = images.shape[-2:]
        features = self.backbone.forward_features(images)
        result = OrderedDict(out=_upsample(self.head(features[self.level]), size))
        # The auxiliary head only shapes training; at eval it would cost time for an output nobody reads.
        if self.aux_head is not None and self.training:
            result["aux"] = _upsample(self.aux_head(features[self.aux_level]), size)
        return result


def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def build_segmentation_model(backbone: Backbone, cfg: Mapping[str, Any], num_classes: int) -> SegmentationModel:
    knobs = segmentation_knobs(cfg)
    check_output_stride(backbone, knobs["output_stride"])
    level, aux_level = head_levels(backbone)
    channels = dict(zip((f"C{s.bit_length() - 1}" for s in backbone.feature_strides), backbone.feature_channels))
    strip_classifier(backbone)
    strip_unused(backbone)
    if knobs["head"] == "deeplabv3":
        head: nn.Module = DeepLabHead(channels[level], num_classes, knobs["atrous_rates"])
    else:
        head = FCNHead(channels[level], num_classes)
    aux_head = None
    if knobs["aux_loss"]:
        if aux_level is None:
            raise ValueError(f"task.aux_loss=true needs a second feature level; backbone {backbone.name} has one")
        aux_head = FCNHead(channels[aux_level], num_classes)
    return SegmentationModel(backbone, head, level, aux_head, aux_level)
