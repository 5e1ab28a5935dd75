"""TSM backbones: timm's 2-D ResNet with the temporal shift in every residual block (Lin et al., "TSM: Temporal
Shift Module for Efficient Video Understanding", ICCV 2019), `tsm_resnet50` (the paper's and Weight Excitation's
Table 6 Jester row, WE Sec. 4.6) and `tsm_resnet18` (the same at ResNet18's cost: the toy video data and tests).

The input is a clip (B, C, T, H, W). The forward folds it into B x T frames, tells the shift modules T (the number
of segments, known only from the data: `data.num_frames`), runs timm's ResNet on the frames and averages the T
frames' logits (TSN's average consensus, which TSM keeps; `clip_frames.py`).

The ResNet is timm's own, untouched but for the shift (`temporal_shift.py`): family `resnet`, timm's layer names,
so the placement rules, the attention add-ons' sites and KernelWarehouse's layouts are ResNet's, every operator
converts the 2-D convolutions exactly as it converts resnet50's, and the state-dict keys are timm's (an ImageNet
checkpoint of the same backbone and op loads with `init_from`, as TSM initialises from ImageNet). The knobs are
ResNet's (zero_init_last, norm_layer, ...) plus `shift_div`.

`forward_features` raises: a clip has no single-image feature pyramid for detection or segmentation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from dynconv.backbones.backbone import BACKBONES, Backbone
from dynconv.backbones.clip_frames import average_over_frames, clip_as_frames
from dynconv.backbones.temporal_shift import add_residual_shift, segments_of
from dynconv.backbones.timm_backbones import FAMILY_KNOBS, timm_backbone
from dynconv.knobs import Knobs

# TSM's 8 segments (Sec. 4: "8 frames" for its main results; WE Sec. 4.6 does not say): the clip length of MACs.
DEFAULT_SEGMENTS = 8
# ResNet's knobs that fit a video network; output_stride (dilation for dense prediction) does not.
RESNET_KNOBS = {key: value for key, value in FAMILY_KNOBS["resnet"].items() if key != "output_stride"}


def video_only_features(name: str):
    """The `features` of a video backbone: a clear refusal instead of a feature pyramid."""

    def refuse(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        raise ValueError(f"backbone {name} is a video classifier: it has no single-image feature maps for "
                         "detection or segmentation (it fits task=video only)")

    return refuse


class TemporalShiftBackbone(Backbone):
    """A timm ResNet with residual shifts; forward: clips (B, C, T, H, W) -> clip logits (B, classes)."""

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        frames, segments = clip_as_frames(clips, self.name)
        with segments_of(self.net, segments):
            return average_over_frames(self.net(frames), segments)


def _register(name: str, timm_name: str) -> None:
    def build(num_classes: int = 1000, image_size: int = 224, drop_rate=None, drop_path_rate=None,
              shift_div: int = 8, **init: Any) -> TemporalShiftBackbone:
        unknown = sorted(set(init) - set(RESNET_KNOBS))
        if unknown:
            raise TypeError(f"backbone {name} has no knob backbone.{unknown[0]} (its knobs: shift_div, "
                            f"{', '.join(RESNET_KNOBS)})")
        # Two folds of C / shift_div channels move, so at most half of them each way (shift_div=2: all channels).
        Knobs({"shift_div": shift_div}, "backbone", owner=f"backbone={name}").integer("shift_div", 2)
        resnet = timm_backbone(name, timm_name, "resnet", num_classes=num_classes, image_size=image_size,
                               drop_rate=drop_rate, drop_path_rate=drop_path_rate, **{**RESNET_KNOBS, **init})
        add_residual_shift(resnet.net, shift_div)
        return TemporalShiftBackbone(name, resnet.net, video_only_features(name), [], [], family="resnet",
                                     clip_length=DEFAULT_SEGMENTS)

    BACKBONES.register(name)(build)


_register("tsm_resnet18", "resnet18")
_register("tsm_resnet50", "resnet50")
