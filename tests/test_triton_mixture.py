"""The "triton" mixture algorithm (dynconv/functional/triton_mixture.py): exact against the per-sample reference in
float64, forward and backward, run on the CPU through Triton's interpreter (the same kernel source the GPU
compiles), and offered by the selector only where it can run (CUDA), to win by measurement."""

from __future__ import annotations

import itertools

import pytest
import torch

from dynconv.functional import mixture, selector, triton_mixture
from dynconv.functional.mixture import mixture_conv2d
from test_per_sample_conv import MIX_CASES, SCALES, _mixture_inputs, _mixture_reference

pytest.importorskip("triton")

CASES = [(case, scales, batch, bias, single)
         for case, scales in itertools.product(sorted(MIX_CASES), SCALES)
         for batch, bias, single in [(3, True, False), (1, False, False), (2, False, True)]]


@pytest.mark.parametrize(("case", "scales", "batch", "bias", "single"), CASES,
                         ids=[f"{c}-{s}-b{b}-{'bias' if bb else 'nobias'}{'-n1' if one else ''}"
                              for c, s, b, bb, one in CASES])
def test_triton_equals_reference_in_float64(case, scales, batch, bias, single):
    """Every geometry of the mixture tests (stride, dilation, 1x1, grouped, depthwise), every ODConv scale set,
    n = 1, batch 1, with and without bias: the interpreted kernel equals one F.conv2d per sample to 1e-12, and its
    backward gives every input's gradient (input, kernels, coefficients, bias, the three scales) to 1e-11."""
    tensors, conv = _mixture_inputs(case, batch, bias, scales, single)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in tensors]
    ref_leaves = [None if t is None else t.clone().requires_grad_(True) for t in tensors]
    y = mixture_conv2d(*leaves[:4], **conv, mode="triton", spatial=leaves[4], channel=leaves[5], filter=leaves[6])
    y_ref = _mixture_reference(*ref_leaves, conv)
    torch.testing.assert_close(y, y_ref, rtol=0.0, atol=1e-12)
    grad_out = torch.randn_like(y_ref)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wanted, grad_out)
    grads_ref = torch.autograd.grad(y_ref, [t for t in ref_leaves if t is not None], grad_out)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0.0, atol=1e-11)


def test_triton_gradients_of_some_inputs_only():
    """Only the coefficients want a gradient (frozen kernels, a fixed input), then only the input: each gets the
    reference's, and nothing else is computed."""
    tensors, conv = _mixture_inputs("stride2-dilation", 3, True, "spatial+channel+filter", False)
    for wanted_index in (2, 0):
        leaves = [None if t is None else t.clone().requires_grad_(i == wanted_index) for i, t in enumerate(tensors)]
        ref_leaves = [None if t is None else t.clone().requires_grad_(i == wanted_index)
                      for i, t in enumerate(tensors)]
        y = mixture_conv2d(*leaves[:4], **conv, mode="triton", spatial=leaves[4], channel=leaves[5],
                           filter=leaves[6])
        (grad,) = torch.autograd.grad(y.square().sum(), leaves[wanted_index])
        (grad_ref,) = torch.autograd.grad(_mixture_reference(*ref_leaves, conv).square().sum(),
                                          ref_leaves[wanted_index])
        torch.testing.assert_close(grad, grad_ref, rtol=0.0, atol=1e-11)


def test_triton_keeps_channels_last():
    """A channels-last input (how training runs on GPUs) is read through its strides and the output keeps its
    layout; the values are the reference's."""
    tensors, conv = _mixture_inputs("3x3", 3, True, "channel", False)
    x = tensors[0].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = mixture_conv2d(x, *tensors[1:4], **conv, mode="triton", channel=tensors[5])
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _mixture_reference(*tensors, conv), rtol=0.0, atol=1e-12)


def test_triton_tiles_cover_several_blocks_and_ragged_edges():
    """More output positions than one BLOCK_P tile, more output channels per group than one BLOCK_O tile, two groups
    and a reduction longer than BLOCK_K, none of them multiples of the tile: every tile and its masked edge are
    right."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 26, 11, 9, dtype=torch.float64, generator=gen)  # K = 117 per group, 99 positions
    experts = torch.randn(3, 300, 13, 3, 3, dtype=torch.float64, generator=gen)  # 150 = 128 + 22 per group
    coefficients = torch.rand(2, 3, dtype=torch.float64, generator=gen)
    bias = torch.randn(3, 300, dtype=torch.float64, generator=gen)
    channel = torch.rand(2, 26, dtype=torch.float64, generator=gen)
    filters = torch.rand(2, 300, dtype=torch.float64, generator=gen)
    conv = dict(stride=1, padding=1, dilation=1, groups=2)
    assert triton_mixture._tiles(99, 150)[:2] == (64, 128)
    with torch.no_grad():
        y = mixture_conv2d(x, experts, coefficients, bias, **conv, mode="triton", channel=channel, filter=filters)
    reference = _mixture_reference(x, experts, coefficients, bias, None, channel, filters, conv)
    torch.testing.assert_close(y, reference, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize(("size", "out_channels", "block_p"), [(64, 16, 128), (5, 40, 32)])
def test_triton_tile_sizes_by_layer_size(size, out_channels, block_p):
    """A large map takes 128-position tiles, a tiny one 32: both exact (float64)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, size, size, dtype=torch.float64, generator=gen)
    experts = torch.randn(2, out_channels, 3, 3, 3, dtype=torch.float64, generator=gen)
    coefficients = torch.rand(1, 2, dtype=torch.float64, generator=gen)
    conv = dict(stride=1, padding=1, dilation=1, groups=1)
    assert triton_mixture._tiles(size * size, out_channels)[0] == block_p
    with torch.no_grad():
        y = mixture_conv2d(x, experts, coefficients, None, **conv, mode="triton")
    reference = _mixture_reference(x, experts, coefficients, None, None, None, None, conv)
    torch.testing.assert_close(y, reference, rtol=0.0, atol=1e-12)


def test_triton_float32_agrees_with_kernels_mode():
    """float32: accumulated in float32 with exact products (no TF32), so within rounding of the kernels mode."""
    tensors, conv = _mixture_inputs("3x3", 3, True, "spatial+channel+filter", False)
    tensors = [None if t is None else t.float() for t in tensors]
    with torch.no_grad():
        y = mixture_conv2d(*tensors[:4], **conv, mode="triton", spatial=tensors[4], channel=tensors[5],
                           filter=tensors[6])
        expected = mixture_conv2d(*tensors[:4], **conv, mode="kernels", spatial=tensors[4], channel=tensors[5],
                                  filter=tensors[6])
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_under_autocast_computes_in_its_dtype(dtype):
    """Under autocast the operands go to autocast's dtype, as for a convolution: half-precision products with
    float32 accumulation, a result in that dtype, within half-precision rounding of the kernels mode under the same
    autocast (whose float32 filter scale makes its own result float32); the gradients reach the float32 parameters
    in float32."""
    tensors, conv = _mixture_inputs("3x3", 3, True, "spatial+channel+filter", False)
    leaves = [t.float().requires_grad_(True) for t in tensors]
    with torch.autocast("cpu", dtype=dtype):
        y = mixture_conv2d(*leaves[:4], **conv, mode="triton", spatial=leaves[4], channel=leaves[5],
                           filter=leaves[6])
        expected = mixture_conv2d(*[t.detach() for t in leaves[:4]], **conv, mode="kernels",
                                  spatial=leaves[4].detach(), channel=leaves[5].detach(), filter=leaves[6].detach())
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected.float(), rtol=0.05, atol=0.02 * expected.abs().max().item())
    grads = torch.autograd.grad(y.float().sum(), leaves)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_selector_offers_triton_only_on_cuda(monkeypatch):
    """On CPU tensors (here) the selector never times it (the interpreter is for tests) and a forced policy
    "triton" falls back to the cost model; where the device allows it, it is a candidate for inference and
    training, under autocast too."""
    tensors, conv = _mixture_inputs("3x3", 2, False, "none", False)
    tensors = [None if t is None else t.float() for t in tensors]
    params = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    with torch.no_grad():
        assert "triton" not in mixture.MIXTURE.timed(tensors, params)
        with selector.policy("triton"):
            assert selector.select(mixture.MIXTURE, tensors, params) == mixture.MIXTURE.cost_model(tensors, params)
    monkeypatch.setattr(triton_mixture, "applicable", lambda x, experts, groups: True)  # as on a GPU
    with torch.no_grad():
        assert "triton" in mixture.MIXTURE.timed(tensors, params)
    wanting_grad = [tensors[0].clone().requires_grad_(True), *tensors[1:]]
    assert "triton" in mixture.MIXTURE.timed(wanting_grad, params)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert "triton" in mixture.MIXTURE.timed(tensors, params)


def test_applicable_needs_cuda_and_wide_enough_groups():
    x = torch.randn(2, 32, 8, 8)
    assert not triton_mixture.applicable(x, torch.randn(4, 32, 32, 3, 3), 1)  # a CPU tensor
    if torch.cuda.is_available():
        assert triton_mixture.applicable(x.cuda(), torch.randn(4, 32, 32, 3, 3).cuda(), 1)
        assert not triton_mixture.applicable(x.cuda(), torch.randn(4, 32, 1, 3, 3).cuda(), 32)  # depthwise


def test_a_kernel_that_cannot_compile_is_dropped_by_the_selector(monkeypatch):
    """A compilation failure (here simulated: Triton's errors are not RuntimeErrors) surfaces as a RuntimeError
    naming the kernel, which the selector's timing treats as a candidate that cannot run: the call still gives the
    right result by another algorithm."""
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise SyntaxError("unsupported on this GPU")
            return launch

    monkeypatch.setattr(triton_mixture, "_compiled", lambda interpreted: Broken())
    tensors, conv = _mixture_inputs("3x3", 3, False, "none", False)
    with pytest.raises(RuntimeError, match="Triton mixture kernel failed: SyntaxError"), torch.no_grad():
        mixture_conv2d(*tensors[:4], **conv, mode="triton")
    monkeypatch.setattr(triton_mixture, "applicable", lambda x, experts, groups: True)
    monkeypatch.setattr(selector, "MEASURE_MIN_MACS", 0)
    selector.clear_cache()
    with selector.policy("measure"), torch.no_grad():
        y = mixture_conv2d(*tensors[:4], **conv)
    chosen = [entry for key, entry in selector.choices().items() if key.startswith("mixture_conv2d")]
    selector.clear_cache()
    assert chosen and "triton" not in chosen[0]["ms"]
    torch.testing.assert_close(y, _mixture_reference(*tensors, conv), rtol=0.0, atol=1e-12)
