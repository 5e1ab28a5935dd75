"""GPU checks (skipped without CUDA): the per-sample routines and a mixed-precision training step on CUDA."""

import pytest
import torch
import torch.nn.functional as F

from dynconv.build import build_backbone
from dynconv.functional import mixture_conv2d, per_sample_conv2d
from dynconv.engine.training_run import to_channels_last

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("algorithm", ["folded", "loop", "auto"])
def test_per_sample_conv_on_cuda_matches_cpu_reference(groups, algorithm):
    """The folded grouped convolution on cuDNN equals per-sample F.conv2d computed on the CPU (float64)."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    weight = torch.randn(3, 8, 8 // groups, 3, 3, dtype=torch.float64)
    bias = torch.randn(3, 8, dtype=torch.float64)
    expected = torch.cat([F.conv2d(x[b : b + 1], weight[b], bias[b], 2, 1, 1, groups) for b in range(3)])
    got = per_sample_conv2d(x.cuda(), weight.cuda(), bias.cuda(), 2, 1, 1, groups, algorithm=algorithm)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-10)


def _mixture_case():
    """x (4, 6, 7, 7), three 6 -> 6 3x3 experts and (4, 3) coefficients, float64."""
    torch.manual_seed(0)
    return (torch.randn(4, 6, 7, 7, dtype=torch.float64), torch.randn(3, 6, 6, 3, 3, dtype=torch.float64),
            torch.rand(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["kernels", "outputs"])
def test_mixture_conv_on_cuda(mode):
    x, experts, coefficients = _mixture_case()
    kernels = (coefficients @ experts.flatten(1)).view(4, 6, 6, 3, 3)
    expected = torch.cat([F.conv2d(x[b : b + 1], kernels[b], None, 1, 1) for b in range(4)])
    got = mixture_conv2d(x.cuda(), experts.cuda(), coefficients.cuda(), None, 1, 1, mode=mode)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("dtype", "tf32"), [(torch.float64, False), (torch.float32, False), (torch.float32, True),
                                           (torch.float16, False), (torch.bfloat16, False)])
def test_triton_mixture_compiled_on_cuda(monkeypatch, dtype, tf32):
    """The compiled Triton kernel (tested on the CPU only through its interpreter) against the per-sample reference:
    several tiles along every dimension, ragged edges, stride 2, every ODConv scale and a bias. float32 products
    follow cuDNN's TF32 setting: exact without it."""
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 24, 19, 17, dtype=torch.float64, generator=gen)
    experts = torch.randn(4, 80, 24, 3, 3, dtype=torch.float64, generator=gen)
    coefficients, bias = torch.rand(3, 4, dtype=torch.float64, generator=gen), torch.randn(4, 80, dtype=torch.float64)
    spatial, channel = torch.rand(3, 3, 3, dtype=torch.float64), torch.rand(3, 24, dtype=torch.float64)
    filters = torch.rand(3, 80, dtype=torch.float64)
    kernels = (coefficients @ experts.flatten(1)).view(3, 80, 24, 3, 3) * spatial[:, None, None] * channel[
        :, None, :, None, None] * filters[:, :, None, None, None]
    mixed_bias = coefficients @ bias * filters
    expected = torch.cat([F.conv2d(x[b : b + 1], kernels[b], mixed_bias[b], 2, 1) for b in range(3)])
    cuda = [t.to("cuda", dtype).requires_grad_(True) for t in (x, experts, coefficients, bias, spatial, channel,
                                                                filters)]
    got = mixture_conv2d(*cuda[:4], 2, 1, mode="triton", spatial=cuda[4], channel=cuda[5], filter=cuda[6])
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-2 if tf32 else 1e-4, torch.float16: 5e-2,
                 torch.bfloat16: 5e-2}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), expected, rtol=tolerance, atol=tolerance * expected.abs().max())
    if dtype == torch.float64:  # the backward (the convolution's own, batch folded into groups) too
        cpu = [t.cpu().detach().requires_grad_(True) for t in cuda]
        reference = mixture_conv2d(*cpu[:4], 2, 1, mode="kernels", spatial=cpu[4], channel=cpu[5], filter=cpu[6])
        grad_out = torch.randn_like(reference)
        for g, g_ref in zip(torch.autograd.grad(got, cuda, grad_out.cuda()),
                            torch.autograd.grad(reference, cpu, grad_out)):
            torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("train", [False, True])
def test_selector_times_triton_on_cuda(monkeypatch, train):
    """On CUDA the Triton kernel is one of the timed candidates, at inference and in training (and only wins by
    measurement)."""
    pytest.importorskip("triton")
    from dynconv.functional import selector

    monkeypatch.setattr(selector, "MEASURE_MIN_MACS", 0)
    selector.clear_cache()
    x, experts, coefficients = (t.float().cuda() for t in _mixture_case())
    experts = experts.repeat(1, 4, 1, 1, 1)  # 24 output channels: wide enough for its tiles
    with selector.policy("measure"), torch.set_grad_enabled(train):
        mixture_conv2d(x.requires_grad_(train), experts, coefficients, None, 1, 1)
    measured = [entry for key, entry in selector.choices().items() if key.startswith("mixture_conv2d cuda")]
    selector.clear_cache()
    assert measured and "triton" in measured[0]["ms"]


@pytest.mark.parametrize("policy", ["keep", "recompute"])
def test_recomputed_kernels_on_cuda_match_the_cpu(policy):
    """kernel_memory on CUDA ("auto" recomputes there): the same gradients as the CPU's, under float64."""
    from dynconv.functional import recompute, selector

    x, experts, coefficients = _mixture_case()
    spatial = torch.rand(4, 3, 3, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_(True) for t in (x, experts, coefficients, spatial)]
        with recompute.kernel_memory(policy if device == "cuda" else "keep"), selector.policy("folded"):
            y = mixture_conv2d(*leaves[:3], None, 1, 1, mode="kernels", spatial=leaves[3])
            results.append([t.cpu() for t in (y, *torch.autograd.grad(y.square().sum(), leaves))])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_condconv_resnet18_trains_under_amp_and_channels_last(amp_dtype):
    """A CondConv ResNet18 step under autocast with channels_last gives a finite loss and changes weights."""
    torch.manual_seed(0)
    model = build_backbone({"name": "resnet18"}, {"name": "condconv", "experts": 2}, {"name": "none"},
                           num_classes=10, image_size=64).backbone.cuda()
    to_channels_last(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device="cuda")
    # timm zero-initialises each residual branch's last BN, so on the first step only layers on the
    # identity path (the downsample shortcuts) receive gradient.
    shortcut = model.net.layer2[0].downsample[0]
    before = shortcut.weight.detach().clone()
    with torch.autocast("cuda", dtype=amp_dtype):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.isfinite(loss)
    assert not torch.equal(before, shortcut.weight.detach())
