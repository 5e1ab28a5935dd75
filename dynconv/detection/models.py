"""torchvision's RetinaNet and Mask R-CNN on a dynconv backbone, with the papers' settings as task knobs.

- RetinaNet (WeightNet Sec. 4.2, following Lin et al. 2017): FPN P3-P7 (P6/P7 from C5), 9 anchors per location
  (3 scales 2^(0, 1/3, 2/3) x 3 ratios 1:2, 1:1, 2:1; base sizes 32..512 on P3..P7), focal loss, foreground IoU
  0.5, background IoU < 0.4, top-1000 candidates per level, NMS 0.5, score 0.05, 100 detections per image.
  `head_norm=group` adds GroupNorm to the head's convs (torchvision's RetinaNet v2 head), which trains faster
  from scratch; the paper's head has none.
- Mask R-CNN (KernelWarehouse Appendix A.1.2, the mmdetection 1x setting of He et al. 2017 with FPN): FPN P2-P6,
  one anchor size per level (32..512) x 3 ratios; RPN 2000/1000 proposals before and after NMS (train/test),
  256 anchors per image; box head of two 1024-d FC layers on 7x7 RoIAlign, 512 RoIs per image; mask head of 4
  3x3 convs (256 ch) + deconv on 14x14 RoIAlign.

Every width and count is a knob (configs/task/*.yaml) so tests and the toy quickstart can shrink them. Classes:
torchvision's convention, K dataset categories + background (label 0). RetinaNet's sigmoid classifier therefore
has one column (label 0) that is never a target; its scores stay below `score_thresh` and the evaluator drops
label 0 anyway.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from dynconv.backbones import Backbone
from dynconv.detection.freeze import apply_freezing, max_stage
from dynconv.detection.neck import BackboneWithFPN
from dynconv.detection.transform import transform_from

log = logging.getLogger("dynconv")

RETINANET_LEVELS = ["C3", "C4", "C5"]  # + P6, P7
MASKRCNN_LEVELS = ["C2", "C3", "C4", "C5"]  # + P6 (max-pool, RPN only)
PYRAMID_LEVELS = 5  # RetinaNet P3-P7, Mask R-CNN P2-P6: one anchor size per level
HEAD_NORMS = ("none", "group")


# ------------------------------------------------------------------------------------------- knob checks
def _fail(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"task.{key}={value!r}: allowed {allowed}")


def _int(cfg: Mapping, key: str, low: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(key, value, f"an integer >= {low}")
    return value


def _float(cfg: Mapping, key: str, low: float, high: float, low_open: bool = False) -> float:
    value = cfg[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        raise _fail(key, value, f"a number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _choice(cfg: Mapping, key: str, allowed: Sequence[str]) -> str:
    value = cfg[key]
    if value not in allowed:
        raise _fail(key, value, " | ".join(allowed))
    return value


def _bool(cfg: Mapping, key: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")
    return value


def _positive_list(cfg: Mapping, key: str, length: int | None = None) -> list[float]:
    value = cfg[key]
    shape = f"a list of {length} positive numbers" if length else "a non-empty list of positive numbers"
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _fail(key, value, shape)
    items = list(value)
    if (not items or (length and len(items) != length)
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in items)):
        raise _fail(key, items, shape)
    return [float(v) for v in items]


def common_knobs(cfg: Mapping) -> dict[str, Any]:
    return {
        "fpn_channels": _int(cfg, "fpn_channels"),
        "frozen_bn": _bool(cfg, "frozen_bn"),
        "frozen_stages": _int(cfg, "frozen_stages", low=-1),
        "score_thresh": _float(cfg, "score_thresh", 0.0, 1.0),
        "nms_thresh": _float(cfg, "nms_thresh", 0.0, 1.0, low_open=True),
        "detections_per_img": _int(cfg, "detections_per_img"),
    }


def retinanet_knobs(cfg: Mapping) -> dict[str, Any]:
    knobs = common_knobs(cfg)
    knobs.update(
        anchor_sizes=_positive_list(cfg, "anchor_sizes", PYRAMID_LEVELS),
        anchor_scales_per_octave=_int(cfg, "anchor_scales_per_octave"),
        aspect_ratios=_positive_list(cfg, "aspect_ratios"),
        topk_candidates=_int(cfg, "topk_candidates"),
        fg_iou_thresh=_float(cfg, "fg_iou_thresh", 0.0, 1.0, low_open=True),
        bg_iou_thresh=_float(cfg, "bg_iou_thresh", 0.0, 1.0),
        head_norm=_choice(cfg, "head_norm", HEAD_NORMS),
    )
    if knobs["bg_iou_thresh"] > knobs["fg_iou_thresh"]:
        raise _fail("bg_iou_thresh", cfg["bg_iou_thresh"], f"a number <= task.fg_iou_thresh ({cfg['fg_iou_thresh']})")
    return knobs


def maskrcnn_knobs(cfg: Mapping) -> dict[str, Any]:
    knobs = common_knobs(cfg)
    knobs.update(
        anchor_sizes=_positive_list(cfg, "anchor_sizes", PYRAMID_LEVELS),
        aspect_ratios=_positive_list(cfg, "aspect_ratios"),
        rpn_nms_thresh=_float(cfg, "rpn_nms_thresh", 0.0, 1.0, low_open=True),
        **{key: _int(cfg, key) for key in (
            "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
            "rpn_post_nms_top_n_test", "rpn_batch_size_per_image", "box_batch_size_per_image",
            "representation_size", "mask_head_channels", "mask_head_layers")},
    )
    return knobs


# ---------------------------------------------------------------------------------------------- builders
def check_frozen_stages(backbone: Backbone, frozen_stages: int) -> None:
    """`task.frozen_stages` must name a stage this backbone has (its classifier already removed)."""
    last = max_stage(backbone)
    if frozen_stages > last:
        raise _fail("frozen_stages", frozen_stages, f"-1 (nothing), 0 (stem) .. {last} (every stage of {backbone.name})")


def _neck(backbone: Backbone, levels: list[str], knobs: dict[str, Any], extra: str) -> BackboneWithFPN:
    """FPN over the backbone, then the freezing options (validated against this backbone's stages)."""
    neck = BackboneWithFPN(backbone, levels, knobs["fpn_channels"], extra)
    check_frozen_stages(backbone, knobs["frozen_stages"])
    log.info("detection backbone %s: %s", backbone.name,
             apply_freezing(backbone, knobs["frozen_bn"], knobs["frozen_stages"]))
    return neck


def build_retinanet(backbone: Backbone, cfg: Mapping, num_classes: int, data=None) -> RetinaNet:
    """RetinaNet with `num_classes` categories (+ background) on `backbone`; sizes and mean/std from `data`."""
    knobs = retinanet_knobs(cfg)
    neck = _neck(backbone, RETINANET_LEVELS, knobs, "p6p7")
    octave = knobs["anchor_scales_per_octave"]
    sizes = tuple(tuple(base * 2 ** (i / octave) for i in range(octave)) for base in knobs["anchor_sizes"])
    anchors = AnchorGenerator(sizes, (tuple(knobs["aspect_ratios"]),) * PYRAMID_LEVELS)
    norm = None
    if knobs["head_norm"] == "group":  # torchvision's RetinaNet v2 head: GroupNorm(32) after each head conv
        norm = functools.partial(nn.GroupNorm, math.gcd(32, neck.out_channels))
    head = RetinaNetHead(neck.out_channels, anchors.num_anchors_per_location()[0], num_classes + 1, norm_layer=norm)
    model = RetinaNet(
        neck, num_classes + 1, anchor_generator=anchors, head=head, score_thresh=knobs["score_thresh"],
        nms_thresh=knobs["nms_thresh"], detections_per_img=knobs["detections_per_img"],
        fg_iou_thresh=knobs["fg_iou_thresh"], bg_iou_thresh=knobs["bg_iou_thresh"],
        topk_candidates=knobs["topk_candidates"],
    )
    model.transform = transform_from(data)
    return model


def build_maskrcnn(backbone: Backbone, cfg: Mapping, num_classes: int, data=None) -> MaskRCNN:
    """Mask R-CNN with `num_classes` categories (+ background) on `backbone`; sizes and mean/std from `data`."""
    knobs = maskrcnn_knobs(cfg)
    neck = _neck(backbone, MASKRCNN_LEVELS, knobs, "maxpool")
    channels = neck.out_channels
    roi_levels = neck.out_levels[:len(MASKRCNN_LEVELS)]  # P2-P5; P6 only feeds the RPN
    anchors = AnchorGenerator(tuple((size,) for size in knobs["anchor_sizes"]),
                              (tuple(knobs["aspect_ratios"]),) * PYRAMID_LEVELS)
    hidden, mask_channels = knobs["representation_size"], knobs["mask_head_channels"]
    model = MaskRCNN(
        neck,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=knobs["rpn_pre_nms_top_n_train"],
        rpn_pre_nms_top_n_test=knobs["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_train=knobs["rpn_post_nms_top_n_train"],
        rpn_post_nms_top_n_test=knobs["rpn_post_nms_top_n_test"],
        rpn_nms_thresh=knobs["rpn_nms_thresh"],
        rpn_batch_size_per_image=knobs["rpn_batch_size_per_image"],
        box_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, hidden),
        box_predictor=FastRCNNPredictor(hidden, num_classes + 1),
        box_score_thresh=knobs["score_thresh"],
        box_nms_thresh=knobs["nms_thresh"],
        box_detections_per_img=knobs["detections_per_img"],
        box_batch_size_per_image=knobs["box_batch_size_per_image"],
        mask_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, [mask_channels] * knobs["mask_head_layers"], 1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
    )
    model.transform = transform_from(data)
    return model
