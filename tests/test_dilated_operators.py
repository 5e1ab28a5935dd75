"""Every operator on a dilated backbone (segmentation's output stride 8: layer3 at dilation 2, layer4 at dilation 4,
with timm's multi-grid first blocks at the previous dilation) equals its per-sample reference, in float64.

The reference runs each sample alone: batch 1 takes a plain `F.conv2d` of that sample's kernel (its own dilation
and padding), so it shares nothing with the batched paths (folded groups, im2col GEMM, mixing inside the GEMM,
KernelWarehouse's cells). Eval mode: BatchNorm (the backbone's and the attention branches') then treats a sample
the same alone or in a batch. Each per-sample algorithm is forced in turn (`selector.policy`).
The operators' own tests check their layer equations at dilation 2 and 4 (test_kw, test_condconv, test_cgc,
test_dcd).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dynconv.build import build_backbone
from dynconv.functional import selector
from op_checks import OP_CONFIG_DIR, calibrate_batch_norm, load_op_config

OPERATORS = sorted(path.stem for path in OP_CONFIG_DIR.glob("*.yaml"))
# The algorithm families an operator may take; a policy that does not concern an operator leaves it its default.
POLICIES = ("folded", "bmm", "outputs", "cells")


def dilated_resnet(op: str) -> nn.Module:
    torch.manual_seed(0)
    built = build_backbone({"name": "resnet18", "output_stride": 8}, load_op_config(op), {"name": "none"},
                           num_classes=5, image_size=32)
    return built.backbone.double()


def test_dilated_backbone_has_the_dilations():
    model = dilated_resnet("static")
    dilations = {name: module.dilation for name, module in model.net.named_modules() if isinstance(module, nn.Conv2d)}
    assert dilations["layer3.1.conv1"] == (2, 2) and dilations["layer4.1.conv2"] == (4, 4)
    assert model.output_stride == 8 and model.forward_features(torch.zeros(1, 3, 32, 32).double())["C5"].shape[-1] == 4


@pytest.mark.parametrize("op", OPERATORS)
def test_operator_on_dilated_backbone_equals_per_sample_reference(op):
    model = dilated_resnet(op)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    calibrate_batch_norm(model, x)
    model.eval()
    dilated = [m for m in model.modules() if getattr(m, "dilation", (1, 1)) in ((2, 2), (4, 4))]
    assert dilated, f"op={op}: no layer of the dilated backbone kept its dilation"
    with torch.no_grad():
        reference = torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])])
        assert reference.abs().max() > 0
        for name in POLICIES:
            with selector.policy(name):
                torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-9,
                                           msg=lambda m, name=name: f"op={op}, policy {name}: {m}")
