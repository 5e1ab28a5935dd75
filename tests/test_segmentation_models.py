"""The segmentation networks (dynconv/tasks/segmentation/models.py, inference.py) on small dilated backbones:
shapes at the input resolution, DeepLabV3's rates from the output stride, the auxiliary head in training only,
sliding-window inference equal to whole-image inference where the windows see the whole context, and the
checks that refuse a task the backbone does not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models.segmentation.deeplabv3 import ASPPConv

from dynconv.build import build_backbone
from dynconv.tasks.segmentation.inference import sliding_window_logits, whole_image_logits, window_starts
from dynconv.tasks.segmentation.models import build_segmentation_model, segmentation_knobs
from dynconv.tasks.segmentation.task import SegmentationTask

TASK = {"name": "segmentation", "head": "deeplabv3", "output_stride": 8, "atrous_rates": None, "aux_loss": True,
        "aux_weight": 0.4, "eval_mode": "whole", "eval_crop": [32, 32], "eval_stride": [16, 16]}


def model_for(backbone="resnet18", op="static", **task):
    cfg = {**TASK, **task}
    built = build_backbone({"name": backbone, "output_stride": cfg["output_stride"]}, {"name": op},
                           {"name": "none"}, num_classes=1000, image_size=48)
    return build_segmentation_model(built.backbone, cfg, num_classes=4)


def test_outputs_at_input_resolution_aux_only_in_training():
    model = model_for()
    x = torch.randn(2, 3, 48, 40)
    out = model.train()(x)
    assert set(out) == {"out", "aux"} and out["out"].shape == out["aux"].shape == (2, 4, 48, 40)
    assert set(model.eval()(x)) == {"out"}
    # The classifier was removed with the rest of what the features do not use.
    assert not any(isinstance(m, nn.Linear) for m in model.backbone.modules())


@pytest.mark.parametrize(("output_stride", "rates"), [(8, [12, 24, 36]), (16, [6, 12, 18])])
def test_aspp_rates_follow_the_output_stride(output_stride, rates):
    model = model_for(output_stride=output_stride)
    found = [m[0].dilation[0] for m in model.head.modules() if isinstance(m, ASPPConv)]
    assert found == rates


def test_fcn_head_and_explicit_rates():
    knobs = segmentation_knobs({**TASK, "atrous_rates": [1, 2, 3]})
    assert knobs["atrous_rates"] == (1, 2, 3)
    model = model_for(head="fcn", aux_loss=False)
    assert model.aux_head is None and model.head[0].in_channels == 512 and model.head[0].out_channels == 128


def test_window_starts_cover_the_image():
    assert window_starts(100, 40, 30) == [0, 30, 60]
    assert window_starts(30, 40, 30) == [0]
    assert window_starts(81, 40, 40) == [0, 40, 41]


def test_sliding_window_averages_overlapping_logits():
    """A per-pixel model (1x1 convolution) gives the same logits in windows as on the whole image, including an
    image smaller than the window (padded, then cropped back)."""
    class PerPixel(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return {"out": self.conv(x)}

    model = PerPixel().eval()
    for shape in [(2, 3, 50, 70), (1, 3, 20, 25)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(sliding_window_logits(model, x, (32, 32), (20, 24)),
                                       whole_image_logits(model, x), rtol=1e-5, atol=1e-5)


def test_task_refuses_an_undilated_backbone_and_bad_knobs():
    built = build_backbone({"name": "resnet18"}, {"name": "static"}, {"name": "none"}, num_classes=10, image_size=32)
    with pytest.raises(ValueError, match="backbone.output_stride=8"):
        SegmentationTask.validate_config(TASK, built.backbone)
    for key, value, allowed in [("head", "pspnet", "deeplabv3, fcn"), ("output_stride", 4, "8, 16, 32"),
                                ("eval_stride", [64, 64], "at most task.eval_crop")]:
        with pytest.raises(ValueError, match=f"task.{key}") as info:
            segmentation_knobs({**TASK, key: value})
        assert allowed in str(info.value)


@pytest.mark.parametrize("op", ["condconv", "kw", "lwe", "dynet"])
def test_dynamic_backbone_trains_one_step(op):
    """Operators convert the dilated layers too, and the loss reaches every trainable parameter."""
    from tests.op_checks import load_op_config

    built = build_backbone({"name": "resnet18", "output_stride": 8}, load_op_config(op), {"name": "none"},
                           num_classes=1000, image_size=32)
    assert any(d.converted and d.layer.module.dilation[0] > 1 for d in built.decisions if d.layer.is_conv)
    task = SegmentationTask(TASK, {}, num_classes=4)
    model = task.build_model(built.backbone).train()
    x, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    masks[:, :4] = 255
    loss, count, extras = task.forward_loss(model, x, masks)
    loss.backward()
    assert count == 2 and set(extras) == {"loss_out", "loss_aux"} and torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
