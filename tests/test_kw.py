"""KernelWarehouse (op=kw): assembling equals a per-sample reference, tau = 1 is the static network of the cells,
shared warehouses are one parameter, the knobs and the schedule behave as the paper says."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.build import build_backbone
from dynconv.engine.hooks.operator_schedule import apply_training_progress, scheduled_modules
from dynconv.functional import selector as choice
from dynconv.ops.kw import KWConv2d, KWLinear, SplitQKV
from dynconv.ops.kw.attention import KWAttention, normalise
from dynconv.ops.kw.layers import Warehouse, link_warehouse
from dynconv.ops.kw.plan import Assignment, KernelShape, beta_targets, parse_budget, partition
from dynconv.profiling import count_params
from op_checks import assert_knob_rejected, load_op_config


def kw_config(**overrides) -> dict:
    return {**load_op_config("kw"), **overrides}


def build(name="resnet18", image_size=32, **overrides):
    torch.manual_seed(0)
    return build_backbone({"name": name}, kw_config(**overrides), {"name": "none"}, num_classes=10,
                          image_size=image_size).backbone


def kw_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (KWConv2d, KWLinear))]


# ------------------------------------------------------------------------ a plain per-sample reference


def reference_kernel(alpha_b: torch.Tensor, cells: torch.Tensor, layer) -> torch.Tensor:
    """Eq. 3 then Eq. 2 with loops: mixture (s, go, gi) -> sum_j alpha_j e_j placed at its block and tap."""
    p = layer.partition
    out_channels, in_per_group, *kernel = layer.kernel_shape
    kh, kw = (kernel + [1, 1])[:2]
    weight = torch.zeros(out_channels, in_per_group, kh, kw, dtype=cells.dtype)
    index = 0
    for s in range(p.spatial_groups):
        for go in range(p.out_groups):
            for gi in range(p.in_groups):
                cell = sum(alpha_b[index, j] * cells[j] for j in range(cells.shape[0]))  # (co, ci, ckh, ckw)
                rows = slice(go * p.cell_out, (go + 1) * p.cell_out)
                cols = slice(gi * p.cell_in, (gi + 1) * p.cell_in)
                if p.spatial_groups > 1:  # spatial partition: cell s is tap (s // kw, s % kw)
                    weight[rows, cols, s // kw, s % kw] = cell[:, :, 0, 0]
                else:
                    weight[rows, cols] = cell
                index += 1
    return weight if len(kernel) == 2 else weight[:, :, 0, 0]


def reference_conv(layer: KWConv2d, x: torch.Tensor) -> torch.Tensor:
    alpha, scales = layer.attention(x.mean(dim=(2, 3)))
    outputs = []
    for b in range(x.shape[0]):
        weight = reference_kernel(alpha[b], layer.warehouse.cells, layer)
        xb = x[b: b + 1]
        if scales is not None:
            xb = xb * scales["channel"][b].view(1, -1, 1, 1)
            if "spatial" in scales:
                weight = weight * scales["spatial"][b].view(1, 1, *layer.kernel_size)
        out = F.conv2d(xb, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        if scales is not None and "filter" in scales:
            out = out * scales["filter"][b].view(1, -1, 1, 1)
        outputs.append(out)
    return torch.cat(outputs)


def standalone_conv(in_channels, out_channels, kernel_size, *, stride=1, groups=1, budget="1", omni=False,
                    basis=1.0, bias=False, shapes_extra=(), dilation=1):
    """One KWConv2d sharing a warehouse with `shapes_extra` other kernels (so n > m), in float64."""
    torch.manual_seed(0)
    shapes = [KernelShape("layer", out_channels, in_channels // groups, (kernel_size, kernel_size)), *shapes_extra]
    budget = parse_budget(budget)
    spec = partition("w", shapes, Assignment("w", budget, Fraction(1, 2) if budget < 1 else Fraction(1)), True)
    cells = spec.layers[0]
    beta = torch.zeros(cells.mixtures, spec.cells + 1)
    for i, targets in enumerate(beta_targets(cells, budget, "one_to_one", spec.cells)):
        beta[i, targets or [spec.cells]] = 1
    attention = KWAttention(in_channels, cells.mixtures, spec.cells, start=cells.start, local_cells=cells.local_cells,
                            reduction=0.0625, norm="batch", function="caf", beta=beta, schedule=lambda e: 0.5,
                            fixed_tau=0.3, nonlocal_basis_ratio=basis,
                            omni=(in_channels, out_channels, kernel_size * kernel_size) if omni else None)
    layer = KWConv2d(in_channels, out_channels, (kernel_size, kernel_size), stride, dilation * (kernel_size // 2),
                     dilation, groups, bias, partition=cells, attention=attention)
    warehouse = Warehouse("w", spec.cells, spec.cell_shape)
    layer.warehouse_module = warehouse  # keep it alive and moved with the layer in this test
    link_warehouse(layer, warehouse)
    if bias:
        nn.init.normal_(layer.bias)
    return layer.double()


from fractions import Fraction  # noqa: E402  (used by the helper above)

CONV_CASES = {
    "3x3-s1": dict(in_channels=8, out_channels=8, kernel_size=3),
    "3x3-s2-wider": dict(in_channels=8, out_channels=16, kernel_size=3, stride=2),
    "1x1-grouped-cells": dict(in_channels=16, out_channels=8, kernel_size=1,
                              shapes_extra=(KernelShape("other", 4, 8, (1, 1)),)),
    "grouped": dict(in_channels=8, out_channels=8, kernel_size=3, groups=2),
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, groups=8),
    # The dilated last stages of segmentation backbones (output stride 8: dilation 2 and 4).
    "3x3-dilation2": dict(in_channels=8, out_channels=8, kernel_size=3, dilation=2),
    "3x3-dilation4-kw-star": dict(in_channels=8, out_channels=16, kernel_size=3, dilation=4, omni=True),
    "depthwise-dilation2": dict(in_channels=8, out_channels=8, kernel_size=3, groups=8, dilation=2),
    "half-budget": dict(in_channels=8, out_channels=8, kernel_size=3, budget="1/2"),
    "kw-star": dict(in_channels=8, out_channels=16, kernel_size=3, omni=True, bias=True),
    "nonlocal-basis": dict(in_channels=8, out_channels=8, kernel_size=3, basis=0.0625,
                           shapes_extra=(KernelShape("other", 8, 8, (3, 3)),) * 3),
}


@pytest.mark.parametrize("algorithm", ["assemble", "cells", "fused"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_batched_equals_per_sample_reference(case, batch, algorithm):
    """Every exact algorithm (kernels assembled per sample; the im2col taps mixed per cell and one GEMM with the
    warehouse; kernels assembled block by block inside the matmul: dynconv/ops/kw/apply.py, fused.py) against
    the loop reference, outputs and gradients."""
    layer = standalone_conv(**CONV_CASES[case])
    layer.eval()  # the attention's BN in eval mode: the same normalisation for the batch and one sample
    x = torch.randn(batch, layer.in_channels, 7, 7, dtype=torch.float64, requires_grad=True)
    if algorithm != "assemble" and layer.groups != 1:
        pytest.skip(f"the {algorithm} algorithm handles groups=1; grouped layers always assemble")
    with choice.policy(algorithm):
        out = layer(x)
    expected = reference_conv(layer, x)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    params = [x, layer.warehouse.cells, *layer.attention.parameters()] + ([layer.bias] if layer.bias is not None else [])
    got = torch.autograd.grad(out, params, grad_out)
    want = torch.autograd.grad(expected, params, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("algorithm", ["assemble", "cells", "fused"])
def test_conv_algorithms_under_bfloat16_autocast(algorithm):
    """Under CPU autocast (recipe.amp=bf16, bench.amp=bf16) every algorithm, "fused" (a custom autograd function)
    included, computes in bfloat16 and returns float32 gradients close to the float32 reference's."""
    torch.manual_seed(0)
    layer = standalone_conv(**CONV_CASES["3x3-s2-wider"]).float().eval()
    x = torch.randn(3, layer.in_channels, 7, 7, requires_grad=True)
    with choice.policy(algorithm), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = reference_conv(layer, x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05 * scale)
    params = [x, layer.warehouse.cells]
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(out.float(), params, grad_out)
    want = torch.autograd.grad(expected, params, grad_out)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.05 * w.abs().max().item())


@pytest.mark.parametrize("batch", [1, 3])
def test_linear_batched_equals_per_sample_reference(batch):
    """KWLinear on tokens (B, N, C) against a per-sample F.linear with the loop-built matrix."""
    model = build("deit_tiny", image_size=32, tau=0.4).double().eval()
    name, layer = next((n, m) for n, m in kw_layers(model) if n.endswith("mlp.fc1"))
    x = torch.randn(batch, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    alpha, _ = layer.attention(x.mean(dim=1))
    expected = torch.cat([F.linear(x[b: b + 1], reference_kernel(alpha[b], layer.warehouse.cells, layer), layer.bias)
                          for b in range(batch)])
    torch.testing.assert_close(out, expected)
    params = [x, layer.warehouse.cells, *layer.attention.parameters(), layer.bias]
    grad_out = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, params, grad_out), torch.autograd.grad(expected, params, grad_out)):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------- tau = 1: the static network


def test_tau_one_budget_one_is_the_static_network_of_the_cells():
    """Appendix A.2: at tau = 1 with b = 1 every mixture is its one-hot cell, so each layer's kernel is its own
    cells, whatever the input, and the network equals a static network with those kernels."""
    model = build(tau=1.0).double().eval()
    static = copy.deepcopy(model)
    for name, layer in kw_layers(model):
        p = layer.partition
        onehot = torch.zeros(p.mixtures, layer.warehouse.cells.shape[0], dtype=torch.float64)
        onehot[torch.arange(p.mixtures), p.start + torch.arange(p.mixtures)] = 1
        weight = reference_kernel(onehot, layer.warehouse.cells, layer)
        for x in (torch.randn(2, layer.in_channels, 5, 5, dtype=torch.float64),
                  torch.randn(2, layer.in_channels, 5, 5, dtype=torch.float64) * 3):
            kernel, _, _ = layer.kernels(x.mean(dim=(2, 3)))
            torch.testing.assert_close(kernel, weight.expand_as(kernel), rtol=0, atol=0)
        parent, _, child = name.rpartition(".")
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, bias=False).double()
        conv.weight.data.copy_(weight)
        setattr(static.get_submodule(parent), child, conv)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model(x), static(x))


def test_half_budget_leftover_mixtures_use_the_zero_cell():
    """b = 1/2 at tau = 1: the mixtures without a cell of their own are zero blocks (the zero cell e_z), the
    others their one-hot cell; the own cells lie on the block diagonal (Appendix A.2, Fig. 6a)."""
    model = build(b="1/2", tau=1.0).double().eval()
    name, layer = next((n, m) for n, m in kw_layers(model) if n == "net.layer1.0.conv1")
    p = layer.partition
    assert (p.out_groups, p.in_groups) == (2, 2) and layer.warehouse.cells.shape[1:3] == (32, 32)
    kernel, _, _ = layer.kernels(torch.randn(1, 64, dtype=torch.float64))
    blocks = kernel[0].view(2, 32, 2, 32, 9)
    assert torch.count_nonzero(blocks[0, :, 1]) == 0 and torch.count_nonzero(blocks[1, :, 0]) == 0
    assert torch.count_nonzero(blocks[0, :, 0]) > 0 and torch.count_nonzero(blocks[1, :, 1]) > 0
    assert sum(t is None for t in p.own_targets) == p.mixtures // 2


# --------------------------------------------------------------------------------- shared warehouses


def test_shared_warehouse_is_one_parameter_updated_by_all_its_layers():
    model = build(tau=0.5).double()
    stage1 = [m for _, m in kw_layers(model) if m.warehouse.key == "stage1"]
    assert len(stage1) == 6  # layer1's four convs + layer2.0.conv1 + layer2.0's shortcut (Table 15)
    assert len({id(m.warehouse.cells) for m in stage1}) == 1
    names = [n for n, p in model.named_parameters() if p is stage1[0].warehouse.cells]
    assert names == ["warehouses.stage1.cells"]
    assert count_params(model) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    for module in model.modules():  # timm zero-initialises each block's last BN: no gradient into the block
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x).square().sum().backward()
    shared_grad = stage1[0].warehouse.cells.grad.clone()
    # The same loss with one private copy of the cells per layer: the shared gradient is their sum.
    aliases = []
    for layer in stage1:
        alias = nn.Module()
        alias.cells = nn.Parameter(layer.warehouse.cells.detach().clone())
        alias.key = "stage1"
        aliases.append(alias)
        layer.__dict__["warehouse"] = alias
    model.zero_grad()
    model(x).square().sum().backward()
    total = sum(alias.cells.grad for alias in aliases)
    torch.testing.assert_close(shared_grad, total)
    assert all(alias.cells.grad.abs().sum() > 0 for alias in aliases)


def test_state_dict_round_trip_and_deepcopy_keep_sharing():
    model = build(tau=0.3).eval()
    other = build(tau=0.3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    other.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(other(x), model(x))
    copied = copy.deepcopy(model)
    layers = [m for _, m in kw_layers(copied) if m.warehouse.key == "stage2"]
    assert layers[0].warehouse is copied.warehouses["stage2"]
    assert len({id(m.warehouse) for m in layers}) == 1
    torch.testing.assert_close(copied(x), model(x))


# ------------------------------------------------------------------------------- schedule and knobs


def test_tau_falls_linearly_per_iteration_over_tau_epochs():
    model = build(tau=None, tau_epochs=10)
    modules = scheduled_modules(model)
    assert modules and all(isinstance(m, KWAttention) for m in modules)
    assert all(float(m.tau) == 1.0 for m in modules)
    assert apply_training_progress(modules, 2.5)["kw_tau"] == pytest.approx(0.75)
    assert apply_training_progress(modules, 12)["kw_tau"] == 0.0
    fixed = scheduled_modules(build(tau=0.0))
    assert apply_training_progress(fixed, 0.0)["kw_tau"] == 0.0  # fine-tuning: tau stays 0


def test_init_none_fixes_tau_at_zero_without_beta():
    model = build(init="none")
    modules = scheduled_modules(model)
    assert all(float(m.tau) == 0.0 and m.beta.sum() == 0 for m in modules)
    assert apply_training_progress(modules, 0.0)["kw_tau"] == 0.0


def test_qkv_is_split_and_only_value_comes_from_a_warehouse():
    model = build("deit_tiny", tau=0.5)
    attn = model.net.blocks[0].attn
    assert isinstance(attn.qkv, SplitQKV) and isinstance(attn.qkv.query_key, nn.Linear)
    assert isinstance(attn.qkv.value, KWLinear) and attn.qkv.value.warehouse.key == "stage1"
    assert isinstance(attn.proj, KWLinear)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("key,value,allowed", [
    ("b", 0, "1/4, 1/2, 3/4, 1, 2, 4"),
    ("sharing", "block", "stage, layer, none"),
    ("sharing_dims", "some", "all, same"),
    ("attention", "tanh", "caf, softmax, sigmoid, relu_norm"),
    ("init", "random", "one_to_one, all_to_one, many_to_one, none"),
    ("tau", 1.5, "[0, 1]"),
    ("partition", "yes", "true, false"),
])
def test_bad_knobs_name_key_and_allowed_values(key, value, allowed):
    assert_knob_rejected(kw_config(), key, value, allowed)


# Table 8's attention functions and what each guarantees of the weights over the n cells + the zero cell.
FUNCTION_PROPERTIES = {
    "softmax": lambda w: bool((w > 0).all()) and torch.allclose(w.sum(-1), torch.ones(w.shape[:-1])),
    "sigmoid": lambda w: bool(((w > 0) & (w < 1)).all()),
    "relu_norm": lambda w: bool((w >= 0).all()) and bool((w.sum(-1) < 1).all()),
    "caf": lambda w: bool((w.abs().sum(-1) < 1).all()) and bool((w < 0).any()),  # signed, L1 below 1
}


@pytest.mark.parametrize("function", sorted(FUNCTION_PROPERTIES))
def test_ablation_attention_functions_train(function):
    """op.attention=<function> (Table 8) is what every KW layer's attention computes, and the network trains
    with it: each warehouse and each attention's FC layers get a finite, non-zero gradient."""
    model = build(attention=function, tau=0.5)
    for module in model.modules():  # timm zero-initialises each block's last BN: reach every layer at step one
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    layers = kw_layers(model)
    assert layers and all(layer.attention.function == function for _, layer in layers)
    pooled = {}
    hooks = [layer.attention.register_forward_pre_hook(lambda m, args, name=name: pooled.setdefault(name, args[0]))
             for name, layer in layers]
    model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).sum().backward()
    for hook in hooks:
        hook.remove()
    for name, layer in layers:
        attention = layer.attention
        with torch.no_grad():
            weights = normalise(attention.logits(torch.relu(attention.norm(attention.fc1(pooled[name])))), function)
        assert FUNCTION_PROPERTIES[function](weights), name
        for pname, param in attention.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name}.attention.{pname}"
        assert attention.fc2.weight.grad.abs().sum() > 0, name
    for key, warehouse in model.warehouses.items():
        grad = warehouse.cells.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key


@pytest.mark.parametrize("strategy", ["all_to_one", "many_to_one"])
@pytest.mark.parametrize("budget", ["1/2", 4])
def test_init_strategies_set_beta_as_table_13(strategy, budget):
    model = build(b=budget, init=strategy, tau=1.0)
    layer = dict(kw_layers(model))["net.layer1.0.conv2"]
    beta = layer.attention.beta[:, :-1]
    if strategy == "all_to_one":
        assert bool((beta == 1).all())
    elif parse_budget(budget) > 1:
        assert bool((beta.sum(1) == 4).all())  # four cells to one mixture (Fig. 5b)
    else:
        assert bool((beta.sum(1) == 1).all()) and bool((beta.sum(0)[beta.sum(0) > 0] == 2).all())  # Fig. 6b


def test_sharing_none_mixes_only_own_cells():
    model = build(sharing="none", tau=0.2)
    layer = dict(kw_layers(model))["net.layer1.0.conv1"]
    alpha, _ = layer.attention(torch.randn(2, 64))
    own = torch.zeros_like(alpha[0], dtype=torch.bool)
    own[torch.arange(alpha.shape[1]), torch.arange(alpha.shape[1])] = True
    assert torch.count_nonzero(alpha[:, ~own]) == 0


def test_backbone_checkpoint_loads_into_the_same_op():
    """Detection fine-tuning starts from a classification checkpoint of a backbone built with the same op."""
    from dynconv.build import load_backbone_weights

    source = build(tau=0.0)
    target = build(tau=0.0)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    skipped = load_backbone_weights(target, {"model": source.state_dict()}, "ckpt.pt")
    assert skipped == []
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))


@pytest.mark.parametrize("case", ["3x3-s2-wider", "kw-star", "1x1-grouped-cells"])
def test_fused_blocks_of_output_channels_equal_the_reference(case, monkeypatch):
    """"fused" assembles the kernels a few output channels at a time (dynconv/ops/kw/fused.py): with blocks of
    one to three channels, within and across output groups, it still equals the loop reference, gradients
    included."""
    from dynconv.functional import mixture_algorithms
    from dynconv.ops.kw import fused

    layer = standalone_conv(**CONV_CASES[case])
    layer.eval()
    k = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    monkeypatch.setattr(mixture_algorithms, "BLOCK_ELEMENTS", 3 * 3 * k)  # batch 3: three channels a block
    x = torch.randn(3, layer.in_channels, 7, 7, dtype=torch.float64, requires_grad=True)
    if layer.partition.cell_out > 3:
        assert len(fused._blocks(layer.partition, 3, k)) > layer.partition.out_groups
    with choice.policy("fused"):
        out = layer(x)
    expected = reference_conv(layer, x)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    params = [x, layer.warehouse.cells, *layer.attention.parameters()]
    for g, w in zip(torch.autograd.grad(out, params, grad_out), torch.autograd.grad(expected, params, grad_out)):
        torch.testing.assert_close(g, w)


def test_warns_when_attentions_dwarf_the_kernels():
    """A warehouse shared by layers of unrelated widths gets tiny cells and quadratic attentions (MobileNetV3-Small
    under the generic layout: ~12x the kernels it makes dynamic): conversion warns, naming the warehouse, its cells
    and op.sharing=layer, which builds without the warning; the paper's layouts never warn."""
    import warnings

    import dynconv

    with torch.device("meta"), pytest.warns(UserWarning, match=r"op=kw on mobilenetv3_small: .*op\.sharing=layer"):
        dynconv.create_model("mobilenetv3_small", op="kw", num_classes=1000)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="op=kw on")
        for name, knobs in [("mobilenetv3_small", {"sharing": "layer"}), ("resnet18", {}), ("mobilenetv2_050",
                                                                                          {"b": 4})]:
            with torch.device("meta"):
                dynconv.create_model(name, op="kw", num_classes=1000, **knobs)
