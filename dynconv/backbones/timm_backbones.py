"""Backbones defined by timm: ResNet family, MobileNetV2/V3, ConvNeXt, DeiT.

Nothing is retyped: each entry is `timm.create_model(...)` plus the placement rules of its layers and the
indices of its multi-scale features (timm's `forward_intermediates`).
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn

from dynconv.backbones.backbone import BACKBONES, FAMILY_RULES, Backbone, PlaceRule

# torchvision's ResNet naming, which timm keeps: conv1 / layerS.B.convK / layerS.B.downsample.0 / fc.
RESNET_RULES = [
    PlaceRule(r"conv1", "stem"),
    PlaceRule(r"(layer(\d)\.\d+)\.conv\d", "auto", stage="g2", block_group=1),
    PlaceRule(r"(layer(\d)\.\d+)\.downsample\.0", "downsample", stage="g2", block_group=1),
    PlaceRule(r"(layer(\d)\.\d+)\.se\..*", "se", stage="g2", block_group=1),
    PlaceRule(r"fc", "classifier", stage=5),
    # attn=bam (dynconv/attention): a module appended to the end of layer1..layer3.
    PlaceRule(r"(layer(\d))\.attn\..*", "se", stage="g2", block_group=1),
]

# timm's EfficientNet-family naming: conv_stem / blocks.S.B.{conv_pw,conv_dw,conv_pwl,conv} / conv_head.
MOBILENET_RULES = [
    PlaceRule(r"conv_stem", "stem"),
    PlaceRule(r"(blocks\.(\d+)\.\d+)\.se\..*", "se", stage="g2", stage_offset=1, block_group=1),
    PlaceRule(r"(blocks\.(\d+)\.\d+)\.conv(_pw|_dw|_pwl)?", "auto", stage="g2", stage_offset=1, block_group=1),
    PlaceRule(r"conv_head", "head", stage=8),
    PlaceRule(r"classifier", "classifier", stage=8),
    # attn=bam (dynconv/attention): a module appended to the end of a stage of blocks.
    PlaceRule(r"(blocks\.(\d+))\.attn\..*", "se", stage="g2", stage_offset=1, block_group=1),
]

CONVNEXT_RULES = [
    PlaceRule(r"stem\.0", "stem"),
    PlaceRule(r"stages\.(\d)\.downsample\.1", "downsample", stage="g1", stage_offset=1),
    PlaceRule(r"(stages\.(\d)\.blocks\.\d+)\.conv_dw", "depthwise", stage="g2", stage_offset=1, block_group=1),
    PlaceRule(r"(stages\.(\d)\.blocks\.\d+)\.mlp\.fc\d", "pointwise", stage="g2", stage_offset=1, block_group=1),
    PlaceRule(r"head\.fc", "classifier", stage=5),
]

# A plain ViT has one stage; its blocks are the units that share routing or warehouses.
DEIT_RULES = [
    PlaceRule(r"patch_embed\.proj", "stem"),
    PlaceRule(r"(blocks\.\d+)\.attn\.(qkv|proj)", "attention", stage=1, block_group=1),
    PlaceRule(r"(blocks\.\d+)\.mlp\.fc\d", "mlp", stage=1, block_group=1),
    PlaceRule(r"head", "classifier", stage=2),
]


def _feature_indices(net: nn.Module) -> list[int]:
    """The last feature of every distinct stride >= 4 (one map per FPN level; ViT: its last block)."""
    info = net.feature_info
    last_of_stride: dict[int, int] = {}
    for index, entry in enumerate(info):
        if entry["reduction"] >= 4:
            last_of_stride[entry["reduction"]] = index
    return [last_of_stride[stride] for stride in sorted(last_of_stride)]


def timm_backbone(name: str, timm_name: str, family: str, *, num_classes: int, image_size: int, vit: bool = False,
                   dynet_reduction: float | None = None, **kw):
    kwargs = {k: v for k, v in kw.items() if v is not None}
    if vit:
        # The position embedding is sized for the training resolution; timm interpolates it when
        # the input size changes (dynamic_img_size) so the same model profiles at 224.
        kwargs.update(img_size=image_size, dynamic_img_size=True)
    net = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    indices = _feature_indices(net)
    info = net.feature_info

    def features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        return model.forward_intermediates(x, indices=indices, intermediates_only=True)

    return Backbone(
        name,
        net,
        features,
        feature_channels=[info[i]["num_chs"] for i in indices],
        feature_strides=[info[i]["reduction"] for i in indices],
        family=family,
        dynet_reduction=dynet_reduction,
    )


def _register(name: str, timm_name: str, family: str, vit: bool = False) -> None:
    def build(num_classes: int = 1000, image_size: int = 224, drop_rate=None, drop_path_rate=None) -> Backbone:
        return timm_backbone(
            name,
            timm_name,
            family,
            num_classes=num_classes,
            image_size=image_size,
            vit=vit,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
        )

    BACKBONES.register(name)(build)


FAMILY_RULES.update(resnet=RESNET_RULES, mobilenetv2=MOBILENET_RULES, mobilenetv3=MOBILENET_RULES,
                    convnext=CONVNEXT_RULES, deit=DEIT_RULES)

for _name in ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet152"):
    _register(_name, _name, "resnet")
_register("mobilenetv2_100", "mobilenetv2_100", "mobilenetv2")
_register("mobilenetv2_050", "mobilenetv2_050", "mobilenetv2")
_register("mobilenetv3_small", "mobilenetv3_small_100", "mobilenetv3")
_register("mobilenetv3_large", "mobilenetv3_large_100", "mobilenetv3")
_register("convnext_tiny", "convnext_tiny", "convnext")
_register("deit_tiny", "deit_tiny_patch16_224", "deit", vit=True)
_register("deit_small", "deit_small_patch16_224", "deit", vit=True)
