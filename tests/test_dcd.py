"""op=dcd (Dynamic Convolution Decomposition, Li et al., ICLR 2021) in float64: in eval mode, the batched layer
against a per-sample loop that builds each sample's W(x) = Λ(x) W_0 + P Φ(x) Q^T from the equations; in train
mode, against the release's feature-space formulation with real BatchNorms (batch statistics, running-statistics
updates); strides, dilation 2, 1x1 and 3x3 kernels, the dynamic classifier; knobs, conversions, ResNet counts."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.build import build_backbone, make_operator
from dynconv.conversion.layer import LayerInfo
from dynconv.ops.dcd import DCDConv2d, DCDLinear, paper_latent, release_latent
from dynconv.profiling import count_params
from op_checks import assert_knob_rejected, load_op_config
from reference_checks import assert_matches_reference


def hsig(z):
    return torch.clamp(z + 3, 0, 6) / 3


def _branch(module, summary):
    """Λ (O,) and Φ (L, L) of one sample: h = W_sq s; h = h hsig(W_ex h); Λ = hsig(W_Λ h); Φ = W_Φ h."""
    branch = module.branch
    h = branch.squeeze.weight @ summary
    h = h * hsig(branch.excite.weight @ h)
    return hsig(branch.scale.weight @ h), (branch.fusion.weight @ h).view(branch.latent, branch.latent)


def _affine(norm):
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


def sample_matrix(module, summary):
    """Eval mode, one sample: Λ, R = P (diag(a2) Φ + I) diag(a1) Q^T and r = P ((diag(a2) Φ + I) c1 + c2)."""
    lam, phi = _branch(module, summary)
    res = module.residual
    (a1, c1), (a2, c2) = _affine(res.compress_norm), _affine(res.fusion_norm)
    mix = torch.diag(a2) @ phi + torch.eye(phi.shape[0], dtype=phi.dtype)
    return lam, res.expand @ mix @ torch.diag(a1) @ res.compress, res.expand @ (mix @ c1 + c2)


def reference_conv(module: DCDConv2d, x):
    """Per sample: W_b = Λ_b W_0 + R_b on the centre tap, bias_b = Λ_b b_0 + r_b, y_b = F.conv2d(x_b, W_b)."""
    outputs = []
    kh, kw = module.kernel_size
    for b in range(x.shape[0]):
        lam, matrix, bias = sample_matrix(module, F.adaptive_avg_pool2d(x[b], module.pool).flatten())
        kernel = lam[:, None, None, None] * module.weight
        kernel = kernel + F.pad(matrix[:, :, None, None], (kw // 2, kw // 2, kh // 2, kh // 2))
        if module.bias is not None:
            bias = bias + lam * module.bias
        outputs.append(F.conv2d(x[b:b + 1], kernel, bias, module.stride, module.padding, module.dilation))
    return torch.cat(outputs)


def release_conv(module: DCDConv2d, x, norms):
    """The release's `conv_basic_dy.forward` in train mode, on the same parameters and real BatchNorms:
    Λ ⊙ (W_0 * x + b_0) + P (BN_2(Φ BN_1(Q^T x_s)) + BN_1(Q^T x_s)), x_s the strided 1x1 positions."""
    batch = x.shape[0]
    lam, phi = zip(*[_branch(module, F.adaptive_avg_pool2d(x[b], module.pool).flatten()) for b in range(batch)])
    lam, phi = torch.stack(lam), torch.stack(phi)
    static = F.conv2d(x, module.weight, module.bias, module.stride, module.padding, module.dilation)
    z = F.conv2d(x, module.residual.compress[:, :, None, None], stride=module.stride)
    h, w = z.shape[-2:]
    z = norms[0](z.flatten(2))  # the release's BatchNorm2d: the same statistics over batch and positions
    latent = norms[1](phi @ z) + z
    return lam[:, :, None, None] * static + (module.residual.expand @ latent).view(batch, -1, h, w)


def _randomise(module):
    with torch.no_grad():  # BatchNorms away from identity; a wider Φ and Λ so that samples differ
        for norm in (module.residual.compress_norm, module.residual.fusion_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.5)
            norm.running_mean.normal_(0, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
        module.branch.fusion.weight.normal_(0, 0.5)
        module.branch.scale.weight.normal_(0, 1.0)
    return module


def _conv_module(kernel, stride, dilation, bias, pool, in_ch=4, out_ch=6):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, dilation * (kernel // 2), dilation, bias=bias)
    return _randomise(DCDConv2d.from_conv(conv, latent=3, hidden=5, pool=pool).double())


def _input(*shape, seed=3):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.3


# (kernel, stride, dilation): 1x1, 3x3, strided, dilated
GEOMETRIES = [(1, 1, 1), (1, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 2)]
CASES = list(itertools.product(GEOMETRIES, [1, 2], [1, 3]))


@pytest.mark.parametrize(("geometry", "pool", "batch"), CASES,
                         ids=[f"k{k}-s{s}-d{d}-p{p}-b{b}" for (k, s, d), p, b in CASES])
def test_eval_matches_per_sample_kernels(geometry, pool, batch):
    """Eval mode: output and every gradient equal the per-sample loop over W(x) = Λ(x) W_0 + P Φ(x) Q^T (1e-10)."""
    kernel, stride, dilation = geometry
    module = _conv_module(kernel, stride, dilation, bias=kernel == 3, pool=pool).eval()
    x = _input(batch, 4, 8, 8)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    names, params = zip(*module.named_parameters())
    assert_matches_reference(module(x), reference_conv(module, x_ref), x, x_ref, names, params)


@pytest.mark.parametrize(("geometry", "batch"), [(g, b) for g in GEOMETRIES for b in (1, 3)],
                         ids=[f"k{k}-s{s}-d{d}-b{b}" for k, s, d in GEOMETRIES for b in (1, 3)])
def test_train_matches_the_release_formulation(geometry, batch):
    """Train mode: the kernel built with the BatchNorms' batch statistics equals the release's feature-space
    computation with real BatchNorms: output, every gradient and the running statistics after the step."""
    kernel, stride, dilation = geometry
    module = _conv_module(kernel, stride, dilation, bias=kernel == 3, pool=2).train()
    norms = [_copy_norm(module.residual.compress_norm), _copy_norm(module.residual.fusion_norm)]
    x = _input(batch, 4, 8, 8)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    names, params = zip(*module.named_parameters())  # the copies share the BatchNorms' scale and shift
    y_ref = release_conv(module, x_ref, norms)
    assert_matches_reference(module(x), y_ref, x, x_ref, names, params)
    for mine, theirs in zip((module.residual.compress_norm, module.residual.fusion_norm), norms):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=0, atol=1e-12)
        assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked) == 1


def _copy_norm(norm):
    """A BatchNorm sharing `norm`'s affine parameters, with its own copy of the running statistics."""
    copy = nn.BatchNorm1d(norm.num_features).double()
    copy.weight, copy.bias = norm.weight, norm.bias
    copy.running_mean.copy_(norm.running_mean)
    copy.running_var.copy_(norm.running_var)
    return copy


def _linear_module(bias=True):
    torch.manual_seed(0)
    return _randomise(DCDLinear(nn.Linear(5, 7, bias=bias), latent=3, hidden=4).double())


@pytest.mark.parametrize("batch", [1, 3])
def test_classifier_eval_matches_per_sample_matrices(batch):
    module = _linear_module().eval()
    x = _input(batch, 5)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    rows = []
    for b in range(batch):
        lam, matrix, bias = sample_matrix(module, x_ref[b])
        rows.append((lam[:, None] * module.weight + matrix) @ x_ref[b] + lam * module.bias + bias)
    names, params = zip(*module.named_parameters())
    assert_matches_reference(module(x), torch.stack(rows), x, x_ref, names, params)


def test_classifier_train_matches_the_release_dycls():
    """The release's DYCls: Λ ⊙ (W_0 x + b_0) + P (BN_2(Φ BN_1(Q^T x)) + BN_1(Q^T x)), batch statistics."""
    module = _linear_module().train()
    norms = [_copy_norm(module.residual.compress_norm), _copy_norm(module.residual.fusion_norm)]
    x = _input(4, 5)
    lam, phi = zip(*[_branch(module, x[b]) for b in range(4)])
    lam, phi = torch.stack(lam), torch.stack(phi)
    z = norms[0](x @ module.residual.compress.t())
    latent = norms[1]((phi @ z[:, :, None]).squeeze(-1)) + z
    expected = lam * F.linear(x, module.weight, module.bias) + latent @ module.residual.expand.t()
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(module.residual.fusion_norm.running_var, norms[1].running_var, rtol=0, atol=1e-12)


def test_batch_of_one_in_train_mode_uses_the_running_statistics():
    """One value per channel has no batch variance: as BatchSafeBatchNorm1d, the running statistics are used and
    left untouched (the release's BatchNorm1d raises)."""
    module = _linear_module().train()
    before = module.residual.compress_norm.running_mean.clone()
    x = _input(1, 5)
    y = module(x)
    torch.testing.assert_close(y, _linear_module().eval()(x), rtol=0, atol=1e-12)
    assert torch.equal(module.residual.compress_norm.running_mean, before)
    y.sum().backward()
    assert module.residual.compress.grad.abs().max() > 0


def test_latent_rules():
    """The paper's floor(C / 2^floor(log2 sqrt C)) and the release's floor(sqrt(p^2 C))."""
    assert [paper_latent(c) for c in (64, 128, 256, 512, 3)] == [8, 16, 16, 32, 3]
    assert [release_latent(c, 2) for c in (64, 128, 256, 512)] == [16, 22, 32, 45]
    assert [release_latent(c, 1) for c in (64, 128, 256, 512)] == [8, 11, 16, 22]


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("latent", "auto", "release, paper, integers >= 1"), ("latent", 0, "release, paper, integers >= 1"),
    ("pool", 0, "integers >= 1"), ("reduction", 0, "integers >= 1"), ("min_hidden", 1.5, "integers >= 1"),
    ("classifier", "yes", "true, false"), ("classifier_latent", 0, "integers >= 1")])
def test_bad_knob_names_key_value_and_allowed(key, value, allowed):
    assert_knob_rejected(load_op_config("dcd"), key, value, allowed)


def _layer(module, role="conv"):
    return LayerInfo("block.conv", module, role, 1, "block", 0)


def test_refuses_what_it_cannot_decompose():
    """Grouped / depthwise convolutions, off-centre paddings and non-classifier Linears stay static, with why."""
    operator = make_operator(load_op_config("dcd"))
    assert "depthwise" in operator.refuse(_layer(nn.Conv2d(8, 8, 3, padding=1, groups=8), "depthwise"))
    assert "centre tap" in operator.refuse(_layer(nn.Conv2d(8, 8, 3, padding=0)))
    assert "centre tap" in operator.refuse(_layer(nn.Conv2d(8, 8, 2, stride=2), "conv"))
    assert "classifier" in operator.refuse(_layer(nn.Linear(8, 8), "mlp"))
    assert operator.refuse(_layer(nn.Conv2d(8, 8, 3, padding=2, dilation=2))) is None
    assert operator.refuse(_layer(nn.Linear(8, 8), "classifier")) is None


def _count(backbone="resnet18", **overrides):
    with torch.device("meta"):
        built = build_backbone({"name": backbone}, {**load_op_config("dcd"), **overrides}, {"name": "none"},
                               num_classes=1000, image_size=224)
    return built, count_params(built.backbone)


def test_resnet18_matches_kernelwarehouse_table_1():
    """The 16 block convolutions and the classifier become DCD, the stem and shortcuts stay static: 14,703,332,
    the release's resnet18_dcd to the parameter (Table 1: 14.70M)."""
    built, params = _count()
    assert params == 14_703_332 and round(params / 1e6, 2) == 14.70
    decisions = {d.layer.name: d for d in built.decisions}
    assert decisions["fc"].converted and not decisions["conv1"].converted
    assert not decisions["layer2.0.downsample.0"].converted
    assert sum(d.converted for d in built.decisions) == 17


def test_other_layouts():
    """Without the dynamic classifier 14,572,644; the paper's L 13,987,784; ResNet-50 with the release's 1x1
    pooling 29,835,056, its resnet50_dcd."""
    assert _count(classifier=False)[1] == 14_572_644
    assert _count(latent="paper")[1] == 13_987_784
    assert _count("resnet50", pool=1)[1] == 29_835_056


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_affine_is_the_batchnorm(momentum):
    """The folded map equals nn.BatchNorm2d on the same values, twice in train mode (running statistics updated
    alike, cumulative average with momentum=None) and once in eval mode."""
    from dynconv.layers.batch_norm_affine import batch_norm_affine

    mine, theirs = nn.BatchNorm2d(3, momentum=momentum).double(), nn.BatchNorm2d(3, momentum=momentum).double()
    with torch.no_grad():
        mine.weight.uniform_(0.5, 1.5)
        mine.bias.normal_()
    theirs.load_state_dict(mine.state_dict())
    for step, train in enumerate([True, True, False]):
        mine.train(train)
        theirs.train(train)
        values = _input(2, 3, 4, 4, seed=step) * (step + 1)
        scale, shift = batch_norm_affine(mine, values)
        torch.testing.assert_close(scale[:, None, None] * values + shift[:, None, None], theirs(values),
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=0, atol=1e-12)


def test_batch_norm_affine_of_a_frozen_batch_norm_is_its_forward():
    """Detection fine-tuning freezes every BatchNorm (Mask R-CNN's default): DCD's latent BatchNorms then are
    fixed affine maps, in train mode too (the CI's maskrcnn x dcd step found `batch_norm_affine` reading
    `track_running_stats` of a FrozenBatchNorm1d)."""
    from dynconv.layers.batch_norm_affine import batch_norm_affine
    from dynconv.tasks.detection.freeze import frozen_copy

    bn = torch.nn.BatchNorm1d(6).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    frozen = frozen_copy(bn).double().train()
    values = torch.randn(5, 6, dtype=torch.float64)
    scale, shift = batch_norm_affine(frozen, values)
    torch.testing.assert_close(scale * values + shift, frozen(values))
