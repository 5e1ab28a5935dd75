"""Module names of other codebases' networks -> the timm module names of dynconv's backbones (`Backbone.net`).

- ResNet: torchvision's `resnet.py`, OSVAI/ODConv `models/od_resnet.py` and OSVAI/KernelWarehouse
  `models/kw_resnet.py` use timm's names (conv1, bn1, layer{1-4}.{i}.conv{1-3}/bn{1-3}/downsample.{0,1}, fc).
- MobileNetV2: torchvision's `mobilenetv2.py`, OSVAI/ODConv `models/od_mobilenetv2.py` and OSVAI/KernelWarehouse
  `models/kw_mobilenetv2.py` / `kw1d2x_mobilenetv2.py` share one layout, `features.{0..18}` + `classifier`:
  features.0 = stem (conv, BN), features.1..17 = the inverted residual blocks of the (t, c, n, s) table in order
  (features.k.conv = [expand ConvBNReLU (t > 1 only), depth-wise ConvBNReLU, projection conv, BN]),
  features.18 = the last 1x1 (conv, BN), classifier = (Dropout, Linear) or a bare Linear. timm names the same
  layers conv_stem / bn1, blocks.{group}.{index}.{conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3} (conv_dw, bn1,
  conv_pw, bn2 in the first, t = 1 group), conv_head / bn2 and classifier.
- ConvNeXt: OSVAI/KernelWarehouse `models/kw_convnext.py` (facebookresearch/ConvNeXt's layout):
  downsample_layers.0 = stem (conv, LayerNorm), downsample_layers.{1-3} = (LayerNorm, conv), stages.{i}.{j} =
  blocks (dwconv, norm, pwconv1, pwconv2, gamma (1, C, 1, 1) in the KernelWarehouse version), norm and head. timm:
  stem.{0,1}, stages.{i}.downsample.{0,1}, stages.{i}.blocks.{j}.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma (C,)},
  head.norm, head.fc.

Each map takes a dotted name of the other layout (a module, or a state-dict key: the parameter name rides along)
and returns timm's, or None when the name is not one of that layout's (the caller reports it as left over).
"""

from __future__ import annotations

from typing import Callable

# Blocks per group of MobileNetV2's (t, c, n, s) table (its n column); every width uses the same table.
MOBILENETV2_BLOCKS = (1, 2, 3, 4, 3, 3, 1)
MOBILENETV2_HEAD_INDEX = 1 + sum(MOBILENETV2_BLOCKS)  # features.18
# Inside features.k.conv: expanding blocks (t > 1) and the first group's blocks (t = 1: no expansion).
_EXPANDING = {("0", "0"): "conv_pw", ("0", "1"): "bn1", ("1", "0"): "conv_dw", ("1", "1"): "bn2", ("2",): "conv_pwl",
              ("3",): "bn3"}
_NOT_EXPANDING = {("0", "0"): "conv_dw", ("0", "1"): "bn1", ("1",): "conv_pw", ("2",): "bn2"}


def resnet_to_timm(name: str) -> str | None:
    return name


def mobilenetv2_block(index: int) -> tuple[int, int]:
    """features.{index} (1..17) -> (timm group, block within the group)."""
    remaining = index - 1
    for group, count in enumerate(MOBILENETV2_BLOCKS):
        if remaining < count:
            return group, remaining
        remaining -= count
    raise IndexError(index)


def mobilenetv2_to_timm(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "classifier":
        # (Dropout, Linear) keeps the Linear at .1; KernelWarehouse's KWLinear wraps its layer as `.conv`.
        rest = parts[1:]
        rest = rest[1:] if rest[:1] == ["1"] else rest
        rest = rest[1:] if rest[:1] == ["conv"] else rest
        return ".".join(["classifier", *rest])
    if parts[0] != "features" or len(parts) < 3 or not parts[1].isdigit():
        return None
    index, rest = int(parts[1]), parts[2:]
    if index in (0, MOBILENETV2_HEAD_INDEX):
        conv, norm = ("conv_stem", "bn1") if index == 0 else ("conv_head", "bn2")
        head = {"0": conv, "1": norm}.get(rest[0])
        return None if head is None else ".".join([head, *rest[1:]])
    if not 0 < index < MOBILENETV2_HEAD_INDEX or rest[0] != "conv":
        return None
    group, block = mobilenetv2_block(index)
    table = _NOT_EXPANDING if group == 0 else _EXPANDING
    for length in (2, 1):
        layer = table.get(tuple(rest[1:1 + length]))
        if layer is not None:
            return ".".join(["blocks", str(group), str(block), layer, *rest[1 + length:]])
    return None


_CONVNEXT_BLOCK = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}


def convnext_to_timm(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "norm":
        return ".".join(["head.norm", *parts[1:]])
    if parts[0] == "head":
        return ".".join(["head.fc", *parts[1:]])
    if parts[0] == "downsample_layers" and len(parts) >= 3:
        stage, rest = parts[1], parts[2:]
        return ".".join(["stem", *rest] if stage == "0" else ["stages", stage, "downsample", *rest])
    if parts[0] == "stages" and len(parts) >= 3:
        stage, block, rest = parts[1], parts[2], parts[3:]
        if not rest or rest[0] == "gamma":  # the block itself, or its layer scale
            return ".".join(["stages", stage, "blocks", block, *rest])
        layer = _CONVNEXT_BLOCK.get(rest[0])
        return None if layer is None else ".".join(["stages", stage, "blocks", block, layer, *rest[1:]])
    return None


# By the family a backbone declares (`Backbone.family`).
TO_TIMM: dict[str, Callable[[str], str | None]] = {
    "resnet": resnet_to_timm,
    "mobilenetv2": mobilenetv2_to_timm,
    "convnext": convnext_to_timm,
}
