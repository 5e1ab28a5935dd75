"""Backbones defined by timm: ResNet family, MobileNetV2/V3, ConvNeXt, DeiT.

Nothing is retyped: each entry is `timm.create_model(...)` plus the placement rules of its layers and the
indices of its multi-scale features (timm's `forward_intermediates`).

Initialisation knobs (docs/initialisation.md), each in the configs of the backbones that take it:

- `zero_init_last` (ResNet family): timm's ResNet argument; None keeps timm's default, true (each residual block's
  last BN scale starts at 0). Every release dynconv reproduces (ODConv, KernelWarehouse, DY-Conv's
  torchvision-style ResNets, WE) starts it at 1: the backbone configs take the recipe's `zero_init_last`, false in
  the papers' recipes, true in the quickstart's.
- `drop_path_schedule` (ResNet family): `linear`, timm's stochastic-depth rule (block i of N drops with
  drop_path_rate * i / (N - 1)), or `constant`, every block drop_path_rate, as KernelWarehouse's `kw_resnet.py`
  and `resnet.py` build it (`DropPath(drop_path)` in every block).
- `classifier_init` (ResNet family, MobileNetV2): `library` keeps timm's (ResNet: nn.Linear's default;
  MobileNetV2: U(+-1/sqrt(classes)), zero bias), `normal` draws N(0, 0.01) with a zero bias, as the torchvision-style
  networks of the ODConv and KernelWarehouse releases do (except KernelWarehouse's `kw_resnet.py`, which keeps
  nn.Linear's default).

Dilation (`output_stride`: 8 | 16 | 32; ResNet family, MobileNetV2, ConvNeXt; timm's MobileNetV3 has no such argument): timm's own argument, which
replaces the strides of the last stages by dilation (DeepLabV3's and the dilated FCN's backbones, docs/segmentation.md).
The features keep their level names (C4, C5) at their nominal strides, `Backbone.output_stride` holds the real one.

Architecture variants (ResNet family; `resnet_variants.py`, docs/training.md), passed the same way:

- `norm_layer` (`batchnorm` | `groupnorm`) and `norm_groups` (32): GroupNorm(32, C) in place of every
  BatchNorm2d (Weight Excitation Table 4's ResNet50-GN).
- `stride_in_1x1` (Bottleneck ResNets): ResNet v1, the downsampling block strides its first 1x1 instead of
  the 3x3 (the 3.86 GMACs of the papers' ResNet50).

MobileNetV2 widths timm does not register (0.6, DyNet Table 1) come from timm's own MobileNetV2 generator with
its channel multiplier (`_mobilenetv2_width`), the definition of every registered width.
"""

from __future__ import annotations

from typing import Callable

import timm
import torch
import torch.nn as nn
from timm.layers import DropPath

from dynconv.backbones.backbone import BACKBONES, FAMILY_RULES, Backbone, PlaceRule
from dynconv.backbones.resnet_variants import NORM_LAYERS, move_stride_to_1x1, norm_layer_argument
from dynconv.knobs import Knobs

DROP_PATH_SCHEDULES = ("linear", "constant")
CLASSIFIER_INITS = ("library", "normal")
OUTPUT_STRIDES = (8, 16, 32)

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


def nominal_reductions(reductions: list[int], output_stride: int | None) -> list[int]:
    """The stride each feature would have without dilation. A dilated network (timm's `output_stride` 8 or 16)
    stops downsampling at `output_stride`: its later stages report that same reduction, so the stages keep
    their level (C4, C5) by doubling the stride where a stage would have downsampled."""
    if not output_stride or output_stride == 32:
        return list(reductions)
    nominal: list[int] = []
    for index, reduction in enumerate(reductions):
        capped = index > 0 and reduction == output_stride and reductions[index - 1] == output_stride
        nominal.append(nominal[-1] * 2 if capped else reduction)
    return nominal


def _feature_indices(net: nn.Module, output_stride: int | None = None) -> list[int]:
    """The last feature of every distinct (nominal) stride >= 4 (one map per FPN level; ViT: its last block)."""
    reductions = nominal_reductions([entry["reduction"] for entry in net.feature_info], output_stride)
    last_of_stride: dict[int, int] = {}
    for index, reduction in enumerate(reductions):
        if reduction >= 4:
            last_of_stride[reduction] = index
    return [last_of_stride[stride] for stride in sorted(last_of_stride)]


def timm_backbone(name: str, timm_name: str | Callable[..., nn.Module], family: str, *, num_classes: int,
                  image_size: int, vit: bool = False, dynet_reduction: float | None = None,
                  drop_path_schedule: str = "linear", classifier_init: str = "library", norm_layer: str = "batchnorm",
                  norm_groups: int = 32, stride_in_1x1: bool = False, output_stride: int | None = None, **kw):
    """`kw` goes to `timm.create_model` (None values left out: timm's defaults), `zero_init_last` included.
    `timm_name` is a timm model name, or a function that builds the network with create_model's arguments.
    `output_stride` 8 or 16 dilates the last stages (timm's argument; DeepLabV3, dilated FCN); 32 or None: none."""
    knobs = Knobs({"drop_path_schedule": drop_path_schedule, "classifier_init": classifier_init,
                   "norm_layer": norm_layer, "norm_groups": norm_groups, "stride_in_1x1": stride_in_1x1,
                   "output_stride": output_stride, **kw},
                  "backbone")
    knobs.choice("drop_path_schedule", DROP_PATH_SCHEDULES)
    knobs.choice("classifier_init", CLASSIFIER_INITS)
    knobs.choice("norm_layer", NORM_LAYERS)
    knobs.integer("norm_groups")
    knobs.flag("stride_in_1x1")
    if output_stride is not None:
        knobs.choice("output_stride", OUTPUT_STRIDES)
    if kw.get("zero_init_last") is not None:
        knobs.flag("zero_init_last")
    kwargs = {k: v for k, v in kw.items() if v is not None}
    kwargs.update(norm_layer_argument(norm_layer, norm_groups))
    if output_stride not in (None, 32):
        kwargs["output_stride"] = int(output_stride)
    constant_drop_path = kwargs.pop("drop_path_rate", 0.0) if drop_path_schedule == "constant" else 0.0
    if vit:
        # The position embedding is sized for the training resolution; timm interpolates it when
        # the input size changes (dynamic_img_size) so the same model profiles at 224.
        kwargs.update(img_size=image_size, dynamic_img_size=True)
    if isinstance(timm_name, str):
        net = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    else:
        net = timm_name(pretrained=False, num_classes=num_classes, **kwargs)
    if stride_in_1x1:
        move_stride_to_1x1(net, name)
    if constant_drop_path:
        set_constant_drop_path(net, constant_drop_path)
    if classifier_init == "normal":
        normal_classifier_(net)
    indices = _feature_indices(net, output_stride)
    info = net.feature_info
    strides = nominal_reductions([entry["reduction"] for entry in info], output_stride)

    def features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        return model.forward_intermediates(x, indices=indices, intermediates_only=True)

    return Backbone(
        name,
        net,
        features,
        feature_channels=[info[i]["num_chs"] for i in indices],
        feature_strides=[strides[i] for i in indices],
        family=family,
        dynet_reduction=dynet_reduction,
        output_stride=int(output_stride or 32),
    )


def set_constant_drop_path(net: nn.Module, rate: float) -> None:
    """Every residual block of a timm ResNet drops its branch with probability `rate` (KernelWarehouse's
    `DropPath(drop_path)` in each block), instead of timm's linear rule. Drop path holds no parameters."""
    blocks = [block for name, block in net.named_modules() if name.count(".") == 1 and name.startswith("layer")]
    if not blocks or not all(hasattr(block, "drop_path") for block in blocks):
        raise ValueError(f"backbone.drop_path_schedule=constant needs a timm ResNet ({type(net).__name__} has no "
                         "residual blocks layer<S>.<B> with drop_path)")
    for block in blocks:
        block.drop_path = DropPath(rate)


@torch.no_grad()
def normal_classifier_(net: nn.Module) -> None:
    """The classifier's weight N(0, 0.01), its bias 0 (torchvision-style ResNet / MobileNetV2 releases)."""
    head = net.get_classifier()
    for layer in head.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


# The knobs each family's builders take beyond the common ones (and their defaults): initialisation choices and
# architecture variants; build.py passes the ones the backbone's config sets.
FAMILY_KNOBS = {
    "resnet": {"zero_init_last": None, "drop_path_schedule": "linear", "classifier_init": "library",
               "norm_layer": "batchnorm", "norm_groups": 32, "stride_in_1x1": False, "output_stride": None},
    "mobilenetv2": {"classifier_init": "library", "output_stride": None},
    "convnext": {"output_stride": None},
}


def _mobilenetv2_width(multiplier: float) -> Callable[..., nn.Module]:
    """A MobileNetV2 of any width from timm's generator (Sandler et al.'s rule, channels rounded to multiples
    of 8, the last 1x1 max(1280, 1280 x width)), which every width timm registers calls with its multiplier
    (mobilenetv2_050 is `_gen_mobilenet_v2("mobilenetv2_050", 0.5)`). The variant name only picks timm's
    pretrained config (input size, mean, std; no weights are loaded): MobileNetV2 1.0's, shared by all widths."""
    from timm.models.efficientnet import _gen_mobilenet_v2

    return lambda **kwargs: _gen_mobilenet_v2("mobilenetv2_100", multiplier, **kwargs)


def _register(name: str, timm_name: str | Callable[..., nn.Module], family: str, vit: bool = False) -> None:
    defaults = FAMILY_KNOBS.get(family, {})

    def build(num_classes: int = 1000, image_size: int = 224, drop_rate=None, drop_path_rate=None,
              **init) -> Backbone:
        unknown = sorted(set(init) - set(defaults))
        if unknown:
            raise TypeError(f"backbone {name} has no knob backbone.{unknown[0]} (its family's knobs: "
                            f"{', '.join(defaults) or 'none'})")
        return timm_backbone(
            name,
            timm_name,
            family,
            num_classes=num_classes,
            image_size=image_size,
            vit=vit,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            **{**defaults, **init},
        )

    BACKBONES.register(name)(build)


FAMILY_RULES.update(resnet=RESNET_RULES, mobilenetv2=MOBILENET_RULES, mobilenetv3=MOBILENET_RULES,
                    convnext=CONVNEXT_RULES, deit=DEIT_RULES)

for _name in ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet152"):
    _register(_name, _name, "resnet")
_register("mobilenetv2_100", "mobilenetv2_100", "mobilenetv2")
_register("mobilenetv2_075", "mobilenetv2_075", "mobilenetv2")
_register("mobilenetv2_060", _mobilenetv2_width(0.6), "mobilenetv2")  # DyNet Table 1's 0.6 (not in timm)
_register("mobilenetv2_050", "mobilenetv2_050", "mobilenetv2")
_register("mobilenetv3_small", "mobilenetv3_small_100", "mobilenetv3")
_register("mobilenetv3_large", "mobilenetv3_large_100", "mobilenetv3")
_register("convnext_tiny", "convnext_tiny", "convnext")
_register("deit_tiny", "deit_tiny_patch16_224", "deit", vit=True)
_register("deit_small", "deit_small_patch16_224", "deit", vit=True)
