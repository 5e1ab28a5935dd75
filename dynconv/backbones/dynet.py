"""The DyNet paper's networks (Zhang et al. 2020, Sec. 3.3) as backbones: `dynet_mobile`, `dynet_shuffle_x1_0`,
`dynet_shuffle_x1_5`, `dynet_resnet18`, `dynet_resnet50`.

They change the architecture (fewer channels, grouped depthwise layers, a 3:1 split), so they are backbones of
their own, built from torchvision's / timm's network definitions (`dynet_mobile.py`, `dynet_shuffle.py`,
`dynet_resnet.py`, each with its assumptions). With `op=dynet` they are the paper's Dy-* networks; with
`op=static` the Fix-* baselines of Table 4. Dy-MobileNetV3 keeps MobileNetV3's channels: it is
`backbone=mobilenetv3_small|large op=dynet`, no new backbone.

Each sets `dynet_reduction`, the coefficient module op=dynet uses with `op.reduction=auto` (one FC for
Dy-mobile and Dy-shuffle, two linear layers with C_in/4 hidden units for Dy-ResNet).
"""

from __future__ import annotations

import functools

from dynconv.backbones.backbone import BACKBONES, Backbone
from dynconv.backbones.dynet_mobile import build_dy_mobile
from dynconv.backbones.dynet_resnet import build_dy_resnet
from dynconv.backbones.dynet_shuffle import build_dy_shuffle

# ShuffleNetV2's [stem, stage2, stage3, stage4, conv5] (Ma et al. 2018, Table 5), before Dy-shuffle's rounding.
SHUFFLENETV2_WIDTHS = {"x1_0": [24, 116, 232, 464, 1024], "x1_5": [24, 176, 352, 704, 1024]}


def _register(name: str, make, knobs: tuple[str, ...] = ()) -> None:
    """`knobs`: the backbone family knobs the network takes (Dy-ResNet: output_stride)."""
    def build(num_classes: int = 1000, image_size: int = 224, drop_rate=None, drop_path_rate=None,
              **family) -> Backbone:
        unknown = sorted(set(family) - set(knobs))
        if unknown:
            raise TypeError(f"backbone {name} has no knob backbone.{unknown[0]} (its knobs: "
                            f"{', '.join(knobs) or 'none'})")
        return make(name, num_classes=num_classes, image_size=image_size, drop_rate=drop_rate,
                    drop_path_rate=drop_path_rate, **family)

    BACKBONES.register(name)(build)


def _ignore_size(builder, **bound):
    """Builders of networks without resolution or stochastic-depth settings."""
    def make(name, num_classes, image_size, drop_rate, drop_path_rate):
        return builder(name, num_classes=num_classes, drop_rate=drop_rate, **bound)
    return make


_register("dynet_mobile", _ignore_size(build_dy_mobile))
for _width, _widths in SHUFFLENETV2_WIDTHS.items():
    _register(f"dynet_shuffle_{_width}", _ignore_size(build_dy_shuffle, widths=_widths))
_register("dynet_resnet18", functools.partial(build_dy_resnet, timm_name="resnet18"), ("output_stride",))
_register("dynet_resnet50", functools.partial(build_dy_resnet, timm_name="resnet50"), ("output_stride",))
