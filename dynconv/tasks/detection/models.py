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
from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from dynconv.backbones import Backbone
from dynconv.knobs import Knobs
from dynconv.tasks.detection.freeze import apply_freezing, max_stage
from dynconv.tasks.detection.neck import BackboneWithFPN
from dynconv.tasks.detection.model_transform import transform_from

log = logging.getLogger("dynconv")

RETINANET_LEVELS = ["C3", "C4", "C5"]  # + P6, P7
MASKRCNN_LEVELS = ["C2", "C3", "C4", "C5"]  # + P6 (max-pool, RPN only)
PYRAMID_LEVELS = 5  # RetinaNet P3-P7, Mask R-CNN P2-P6: one anchor size per level
HEAD_NORMS = ("none", "group")


# ------------------------------------------------------------------------------------------- knob checks
def task_knobs(cfg: Mapping) -> Knobs:
    """The `task.*` knobs of a detector, read through the one validator (errors name task.<key>)."""
    return Knobs(cfg, "task", owner=f"task={cfg.get('name')}", error=ValueError)


def common_knobs(knobs: Knobs) -> dict[str, Any]:
    return {
        "fpn_channels": knobs.integer("fpn_channels"),
        "frozen_bn": knobs.flag("frozen_bn"),
        "frozen_stages": knobs.integer("frozen_stages", low=-1),
        "score_thresh": knobs.number_in("score_thresh", 0.0, 1.0),
        "nms_thresh": knobs.number_in("nms_thresh", 0.0, 1.0, low_open=True),
        "detections_per_img": knobs.integer("detections_per_img"),
        "anchor_sizes": knobs.number_list("anchor_sizes", PYRAMID_LEVELS),
        "aspect_ratios": knobs.number_list("aspect_ratios"),
    }


def retinanet_knobs(cfg: Mapping) -> dict[str, Any]:
    knobs = task_knobs(cfg)
    values = common_knobs(knobs)
    values.update(
        anchor_scales_per_octave=knobs.integer("anchor_scales_per_octave"),
        topk_candidates=knobs.integer("topk_candidates"),
        fg_iou_thresh=knobs.number_in("fg_iou_thresh", 0.0, 1.0, low_open=True),
        bg_iou_thresh=knobs.number_in("bg_iou_thresh", 0.0, 1.0),
        head_norm=knobs.choice("head_norm", HEAD_NORMS),
    )
    if values["bg_iou_thresh"] > values["fg_iou_thresh"]:
        raise knobs.fail("bg_iou_thresh", cfg["bg_iou_thresh"], f"a number <= task.fg_iou_thresh ({cfg['fg_iou_thresh']})")
    return values


def maskrcnn_knobs(cfg: Mapping) -> dict[str, Any]:
    knobs = task_knobs(cfg)
    values = common_knobs(knobs)
    values.update(
        rpn_nms_thresh=knobs.number_in("rpn_nms_thresh", 0.0, 1.0, low_open=True),
        **{key: knobs.integer(key) for key in (
            "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
            "rpn_post_nms_top_n_test", "rpn_batch_size_per_image", "box_batch_size_per_image",
            "representation_size", "mask_head_channels", "mask_head_layers")},
    )
    return values


# ---------------------------------------------------------------------------------------------- builders
def check_frozen_stages(backbone: Backbone, cfg: Mapping, frozen_stages: int) -> None:
    """`task.frozen_stages` must name a stage this backbone has (its classifier already removed)."""
    last = max_stage(backbone)
    if frozen_stages > last:
        raise task_knobs(cfg).fail("frozen_stages", frozen_stages,
                                   f"-1 (nothing), 0 (stem) .. {last} (every stage of {backbone.name})")


def _neck(backbone: Backbone, levels: list[str], cfg: Mapping, knobs: dict[str, Any], extra: str) -> BackboneWithFPN:
    """FPN over the backbone, then the freezing options (validated against this backbone's stages)."""
    neck = BackboneWithFPN(backbone, levels, knobs["fpn_channels"], extra)
    check_frozen_stages(backbone, cfg, knobs["frozen_stages"])
    log.info("detection backbone %s: %s", backbone.name,
             apply_freezing(backbone, knobs["frozen_bn"], knobs["frozen_stages"]))
    return neck


def build_retinanet(backbone: Backbone, cfg: Mapping, num_classes: int, data=None) -> RetinaNet:
    """RetinaNet with `num_classes` categories (+ background) on `backbone`; sizes and mean/std from `data`."""
    knobs = retinanet_knobs(cfg)
    neck = _neck(backbone, RETINANET_LEVELS, cfg, knobs, "p6p7")
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
    neck = _neck(backbone, MASKRCNN_LEVELS, cfg, knobs, "maxpool")
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
