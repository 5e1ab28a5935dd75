"""per_sample_conv2d: every algorithm computes y_b = W_b * x_b exactly; MAC counting; shape errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dynconv.ops.per_sample_conv import canonical_cost_mode, mixture_conv2d, per_sample_conv2d

# (in, out, kernel, stride, padding, dilation, groups, size)
GEOMETRIES = {
    "plain3x3": (4, 6, 3, 1, 1, 1, 1, 7),
    "stride2": (4, 6, 3, 2, 1, 1, 1, 9),
    "nopad": (4, 6, 3, 1, 0, 1, 1, 7),
    "asym-pad-stride": (4, 6, (3, 1), (2, 1), (1, 0), 1, 1, 8),
    "dilation2": (4, 6, 3, 1, 2, 2, 1, 9),
    "pointwise": (4, 6, 1, 1, 0, 1, 1, 5),
    "groups2": (4, 6, 3, 1, 1, 1, 2, 7),
    "depthwise": (6, 6, 3, 2, 1, 1, 6, 8),
    "large-output": (3, 4, 3, 1, 1, 1, 1, 16),  # 256 output positions: auto picks folded, not bmm
}


def _inputs(geometry, batch, bias):
    in_ch, out_ch, kernel, stride, padding, dilation, groups, size = GEOMETRIES[geometry]
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    gen = torch.Generator().manual_seed(batch * 7 + len(geometry))
    x = torch.randn(batch, in_ch, size, size, dtype=torch.float64, generator=gen)
    w = torch.randn(batch, out_ch, in_ch // groups, *kernel, dtype=torch.float64, generator=gen)
    b = torch.randn(batch, out_ch, dtype=torch.float64, generator=gen) if bias else None
    return x, w, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _reference(x, w, b, conv):
    """Independent of the library: F.conv2d once per sample with that sample's kernel."""
    return torch.cat([F.conv2d(x[i : i + 1], w[i], None if b is None else b[i], conv["stride"], conv["padding"],
                               conv["dilation"], conv["groups"]) for i in range(x.shape[0])])


ALGOS = ["folded", "bmm", "loop", "auto"]
CASES = list(itertools.product(sorted(GEOMETRIES), [1, 4], [True, False], ALGOS))


@pytest.mark.parametrize(("geometry", "batch", "bias", "algorithm"), CASES,
                         ids=[f"{g}-b{b}-{'bias' if bb else 'nobias'}-{a}" for g, b, bb, a in CASES])
def test_algorithms_agree_with_reference(geometry, batch, bias, algorithm):
    """Each algorithm equals the per-sample F.conv2d reference (float64, 1e-12), forward and input/weight/bias
    gradients. bmm handles groups=1 only and must refuse grouped convolutions at batch > 1 with ValueError."""
    x, w, b, conv = _inputs(geometry, batch, bias)
    if algorithm == "bmm" and conv["groups"] != 1 and batch > 1:
        with pytest.raises(ValueError, match="groups=1"):
            per_sample_conv2d(x, w, b, **conv, algorithm=algorithm)
        return
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    y = per_sample_conv2d(*leaves[:2], leaves[2] if bias else None, **conv, algorithm=algorithm)
    y_ref = _reference(*ref_leaves[:2], ref_leaves[2] if bias else None, conv)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=0.0, atol=1e-12)
    grad_out = torch.randn_like(y_ref)
    for g, g_ref in zip(torch.autograd.grad(y, leaves, grad_out), torch.autograd.grad(y_ref, ref_leaves, grad_out)):
        torch.testing.assert_close(g, g_ref, rtol=0.0, atol=1e-12)


def test_samples_really_use_their_own_kernel():
    """Swapping two samples' kernels changes their outputs (rules out an implementation using weight[0] for all)."""
    x, w, b, conv = _inputs("plain3x3", 4, False)
    for algorithm in ("folded", "bmm", "loop"):
        y = per_sample_conv2d(x, w, None, **conv, algorithm=algorithm)
        swapped = per_sample_conv2d(x, w[[1, 0, 2, 3]], None, **conv, algorithm=algorithm)
        assert not torch.allclose(y[0], swapped[0]) and torch.equal(y[2], swapped[2])


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("geometry", ["plain3x3", "stride2", "groups2", "depthwise", "dilation2"])
def test_folded_mac_count_is_batch_times_plain_conv(geometry):
    """The folded path at batch 4 counts exactly 4x the MACs of one plain convolution of the same shape.

    The batch is folded into the groups (B*O output channels, B*g groups, input batch 1): the counter must
    see C/g input channels per group, so it neither multiplies by B twice nor divides by the groups wrongly.
    """
    x, w, _, conv = _inputs(geometry, 4, False)
    plain = _flops(lambda: F.conv2d(x[:1], w[0], None, conv["stride"], conv["padding"], conv["dilation"],
                                    conv["groups"]))
    assert plain > 0
    folded = _flops(lambda: per_sample_conv2d(x, w, None, **conv, algorithm="folded"))
    assert folded == 4 * plain
    with canonical_cost_mode():  # auto must take the folded (paper) path in canonical mode
        assert _flops(lambda: per_sample_conv2d(x, w, None, **conv)) == 4 * plain


def test_bmm_mac_count_matches_folded():
    """bmm (im2col) counts the same multiply-accumulates as the folded convolution for groups=1."""
    x, w, _, conv = _inputs("plain3x3", 4, False)
    assert _flops(lambda: per_sample_conv2d(x, w, None, **conv, algorithm="bmm")) == _flops(
        lambda: per_sample_conv2d(x, w, None, **conv, algorithm="folded"))


def test_canonical_mixture_counts_paper_cost():
    """In canonical_cost_mode a mixture convolution counts the paper's cost: one per-sample conv (B x plain)
    plus the kernel mixing matmul (B x n x O*C/g*k*k), not n full convolutions."""
    batch, experts = 4, 3
    x, w, _, conv = _inputs("plain3x3", batch, False)
    bank = w[:experts].clone()
    coeff = torch.rand(batch, experts, dtype=torch.float64)
    plain = _flops(lambda: F.conv2d(x[:1], bank[0], None, conv["stride"], conv["padding"], 1, 1))
    with canonical_cost_mode():
        counted = _flops(lambda: mixture_conv2d(x, bank, coeff, None, conv["stride"], conv["padding"], 1, 1))
    assert counted == batch * plain + 2 * batch * experts * bank[0].numel()


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "groups", "algorithm", "match"),
    [
        ((2, 4, 5, 5), (6, 4, 3, 3), 1, "auto", "per-sample weight"),  # 4-D weight: a plain conv kernel
        ((2, 4, 5, 5), (3, 6, 4, 3, 3), 1, "auto", "per-sample weight"),  # batch mismatch
        ((1, 4, 5, 5), (2, 6, 4, 3, 3), 1, "auto", "per-sample weight"),  # batch mismatch at B=1
        ((2, 4, 5, 5), (2, 6, 3, 3, 3), 1, "folded", "input channels"),  # C/g does not match the input
        ((2, 4, 5, 5), (2, 6, 4, 3, 3), 2, "folded", "input channels"),  # groups inconsistent with weight
        ((2, 4, 5, 5), (2, 6, 2, 3, 3), 2, "bmm", "groups=1"),
        ((2, 4, 5, 5), (2, 6, 4, 3, 3), 1, "winograd", "unknown algorithm"),
    ],
)
def test_bad_shapes_raise_value_error(x_shape, w_shape, groups, algorithm, match):
    """Shape and argument errors are ValueErrors with a message saying what is wrong (not an opaque
    RuntimeError from deep inside F.conv2d, nor a silently wrong result)."""
    x = torch.randn(*x_shape)
    w = torch.randn(*w_shape)
    with pytest.raises(ValueError, match=match):
        per_sample_conv2d(x, w, None, padding=1, groups=groups, algorithm=algorithm)


def test_unknown_algorithm_rejected_at_batch_one():
    """An invalid `algorithm` is an error whatever the batch size (export and single-image inference use B=1,
    so a typo there would otherwise surface only in training)."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(1, 6, 4, 3, 3)
    with pytest.raises(ValueError, match="unknown algorithm"):
        per_sample_conv2d(x, w, None, padding=1, algorithm="winograd")
