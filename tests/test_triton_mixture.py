"""The "triton" mixture algorithm (dynconv/functional/triton_mixture.py): exact against the per-sample reference in
float64, run on the CPU through Triton's interpreter (the same kernel source the GPU compiles), and offered by the
selector only where it can run and win (CUDA inference)."""

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
    n = 1, batch 1, with and without bias: the interpreted kernel equals one F.conv2d per sample to 1e-12."""
    tensors, conv = _mixture_inputs(case, batch, bias, scales, single)
    with torch.no_grad():
        y = mixture_conv2d(*tensors[:4], **conv, mode="triton", spatial=tensors[4], channel=tensors[5],
                           filter=tensors[6])
    torch.testing.assert_close(y, _mixture_reference(*tensors, conv), rtol=0.0, atol=1e-12)


def test_triton_tiles_cover_several_blocks_and_ragged_edges():
    """More output positions than one BLOCK_P tile, more output channels than one BLOCK_O tile and a reduction
    longer than BLOCK_K, none of them multiples of the tile: every tile and its masked edge are right."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, 11, 9, dtype=torch.float64, generator=gen)  # K = 117, 99 positions
    experts = torch.randn(3, 70, 13, 3, 3, dtype=torch.float64, generator=gen)  # 70 = 64 + 6 output channels
    coefficients = torch.rand(2, 3, dtype=torch.float64, generator=gen)
    bias = torch.randn(3, 70, dtype=torch.float64, generator=gen)
    channel = torch.rand(2, 13, dtype=torch.float64, generator=gen)
    filters = torch.rand(2, 70, dtype=torch.float64, generator=gen)
    conv = dict(stride=1, padding=1, dilation=1, groups=1)
    with torch.no_grad():
        y = mixture_conv2d(x, experts, coefficients, bias, **conv, mode="triton", channel=channel, filter=filters)
    reference = _mixture_reference(x, experts, coefficients, bias, None, channel, filters, conv)
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


def test_triton_refuses_gradients_with_a_clear_error():
    """Inference only: asked for a graph it says so, and names what to do, instead of returning a result whose
    backward would be silently missing."""
    tensors, conv = _mixture_inputs("3x3", 2, False, "none", False)
    x = tensors[0].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inference-only"):
        mixture_conv2d(x, *tensors[1:4], **conv, mode="triton")


def test_selector_offers_triton_only_for_cuda_inference(monkeypatch):
    """On CPU tensors (here) the selector never times it (the interpreter is for tests), a forced policy
    "triton" falls back to the cost model, and with a gradient wanted it is not a candidate even where the
    device would allow it."""
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
    assert "triton" not in mixture.MIXTURE.timed(wanting_grad, params)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert "triton" not in mixture.MIXTURE.timed(tensors, params)


def test_applicable_needs_cuda_and_wide_enough_groups():
    x = torch.randn(2, 32, 8, 8)
    assert not triton_mixture.applicable(x, torch.randn(4, 32, 32, 3, 3), 1)  # a CPU tensor
    if torch.cuda.is_available():
        assert triton_mixture.applicable(x.cuda(), torch.randn(4, 32, 32, 3, 3).cuda(), 1)
        assert not triton_mixture.applicable(x.cuda(), torch.randn(4, 32, 1, 3, 3).cuda(), 32)  # depthwise
