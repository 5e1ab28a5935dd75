"""per_sample_conv2d and mixture_conv2d: every algorithm computes the same exact result (float64 against a
per-sample F.conv2d reference); MAC counting; shape errors; the measured-and-cached algorithm choice."""

from __future__ import annotations

import contextlib
import itertools
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dynconv.functional import counting_macs, mixture_conv2d, per_sample_conv2d, selector

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


# "export": "auto" inside selector.exporting(), the batch-independent algorithm an exported graph records.
ALGOS = ["folded", "bmm", "bmm_t", "loop", "auto", "export"]
CASES = list(itertools.product(sorted(GEOMETRIES), [1, 4], [True, False], ALGOS))


@pytest.mark.parametrize(("geometry", "batch", "bias", "algorithm"), CASES,
                         ids=[f"{g}-b{b}-{'bias' if bb else 'nobias'}-{a}" for g, b, bb, a in CASES])
def test_algorithms_agree_with_reference(geometry, batch, bias, algorithm):
    """Each algorithm equals the per-sample F.conv2d reference (float64, 1e-12), forward and input/weight/bias
    gradients, for every geometry: bmm on grouped and depthwise kernels too, and the export formulation at batch 1
    (where it skips the plain-convolution shortcut)."""
    x, w, b, conv = _inputs(geometry, batch, bias)
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    with selector.exporting() if algorithm == "export" else contextlib.nullcontext():
        y = per_sample_conv2d(*leaves[:2], leaves[2] if bias else None, **conv,
                              algorithm="auto" if algorithm == "export" else algorithm)
    y_ref = _reference(*ref_leaves[:2], ref_leaves[2] if bias else None, conv)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=0.0, atol=1e-12)
    grad_out = torch.randn_like(y_ref)
    for g, g_ref in zip(torch.autograd.grad(y, leaves, grad_out), torch.autograd.grad(y_ref, ref_leaves, grad_out)):
        torch.testing.assert_close(g, g_ref, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_im2col_equals_unfold(geometry):
    """dynconv's im2col (strided slices: the form that exports to fast ONNX) is F.unfold, value for value and in
    the same layout, for every geometry (stride, asymmetric padding, dilation, 1x1), and so is its gradient."""
    from dynconv.functional.im2col import im2col

    x, w, _, conv = _inputs(geometry, 3, False)
    args = (w.shape[-2:], conv["dilation"], conv["padding"], conv["stride"])
    leaf, ref_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    columns, reference = im2col(leaf, *args), F.unfold(ref_leaf, *args)
    assert torch.equal(columns, reference)
    grad = torch.randn_like(reference)
    torch.testing.assert_close(torch.autograd.grad(columns, leaf, grad)[0],
                               torch.autograd.grad(reference, ref_leaf, grad)[0], rtol=0, atol=1e-12)


def test_samples_really_use_their_own_kernel():
    """Swapping two samples' kernels changes their outputs (rules out an implementation using weight[0] for all)."""
    x, w, b, conv = _inputs("plain3x3", 4, False)
    for algorithm in ("folded", "bmm", "bmm_t", "loop"):
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
    with counting_macs():  # auto must take the folded (paper) path in canonical mode
        assert _flops(lambda: per_sample_conv2d(x, w, None, **conv)) == 4 * plain


def test_bmm_mac_count_matches_folded():
    """bmm (im2col) counts the same multiply-accumulates as the folded convolution for groups=1."""
    x, w, _, conv = _inputs("plain3x3", 4, False)
    assert _flops(lambda: per_sample_conv2d(x, w, None, **conv, algorithm="bmm")) == _flops(
        lambda: per_sample_conv2d(x, w, None, **conv, algorithm="folded"))


def test_canonical_mixture_counts_paper_cost():
    """In counting_macs a mixture convolution counts the paper's cost: one per-sample conv (B x plain)
    plus the kernel mixing matmul (B x n x O*C/g*k*k), not n full convolutions."""
    batch, experts = 4, 3
    x, w, _, conv = _inputs("plain3x3", batch, False)
    bank = w[:experts].clone()
    coeff = torch.rand(batch, experts, dtype=torch.float64)
    plain = _flops(lambda: F.conv2d(x[:1], bank[0], None, conv["stride"], conv["padding"], 1, 1))
    with counting_macs():
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


# ------------------------------------------------------------------------------------- mixture algorithms

MIX_CASES = {  # name: (in, out, kernel, stride, padding, dilation, groups, size, experts)
    "3x3": (4, 6, 3, 1, 1, 1, 1, 7, 3),
    "stride2-dilation": (4, 6, 3, 2, 2, 2, 1, 9, 2),
    "pointwise": (4, 6, 1, 1, 0, 1, 1, 5, 3),
    "grouped": (4, 6, 3, 1, 1, 1, 2, 6, 3),
    "depthwise": (4, 4, 3, 1, 1, 1, 4, 6, 2),
}
SCALES = ["none", "spatial", "channel", "spatial+channel", "filter", "spatial+channel+filter"]


def _mixture_inputs(case, batch, bias, scales, single):
    in_ch, out_ch, kernel, stride, padding, dilation, groups, size, n = MIX_CASES[case]
    n = 1 if single else n
    gen = torch.Generator().manual_seed(11 * batch + n)
    x = torch.randn(batch, in_ch, size, size, dtype=torch.float64, generator=gen)
    experts = torch.randn(n, out_ch, in_ch // groups, kernel, kernel, dtype=torch.float64, generator=gen)
    coeff = None if single else torch.rand(batch, n, dtype=torch.float64, generator=gen)
    ebias = torch.randn(n, out_ch, dtype=torch.float64, generator=gen) if bias else None
    spatial = torch.rand(batch, kernel, kernel, dtype=torch.float64, generator=gen) if "spatial" in scales else None
    channel = torch.rand(batch, in_ch, dtype=torch.float64, generator=gen) if "channel" in scales else None
    filters = (torch.rand(batch, out_ch, dtype=torch.float64, generator=gen) if "filter" in scales
               else None)
    return (x, experts, coeff, ebias, spatial, channel, filters), dict(stride=stride, padding=padding, dilation=dilation,
                                                             groups=groups)


def _mixture_reference(x, experts, coeff, ebias, spatial, channel, filters, conv):
    """Independent of the library: W_b = (sum_i c_bi W_i) . spatial_b . channel_b . filter_b, bias_b . filter_b,
    one F.conv2d per sample."""
    out_ch, in_per_group = experts.shape[1:3]
    groups = conv["groups"]
    in_index = (torch.arange(out_ch)[:, None] // (out_ch // groups)) * in_per_group + torch.arange(in_per_group)
    outputs = []
    for b in range(x.shape[0]):
        c = torch.ones(1, dtype=x.dtype) if coeff is None else coeff[b]
        w = sum(c[i] * experts[i] for i in range(experts.shape[0]))
        if spatial is not None:
            w = w * spatial[b]
        if channel is not None:
            w = w * channel[b][in_index][:, :, None, None]
        bb = None if ebias is None else sum(c[i] * ebias[i] for i in range(ebias.shape[0]))
        if filters is not None:
            w = w * filters[b][:, None, None, None]
            bb = None if bb is None else bb * filters[b]
        outputs.append(F.conv2d(x[b : b + 1], w, bb, conv["stride"], conv["padding"], conv["dilation"], groups))
    return torch.cat(outputs)


def _unsupported(mode, scales, conv):
    return (mode == "outputs" and "spatial" in scales) or (mode == "fused" and conv["groups"] != 1)


# "export": "auto" inside selector.exporting() (outputs or kernels, whichever the cost model prefers per sample).
MIXTURE_MODE_CASES = ["kernels", "outputs", "fused", "export"]
MIXTURE_TESTS = [(case, mode, scales, batch, bias, single)
                 for case, mode, scales in itertools.product(sorted(MIX_CASES), MIXTURE_MODE_CASES, SCALES)
                 for batch, bias, single in [(3, True, False), (1, False, False), (2, False, True)]]


@pytest.mark.parametrize(("case", "mode", "scales", "batch", "bias", "single"), MIXTURE_TESTS,
                         ids=[f"{c}-{m}-{s}-b{b}-{'bias' if bb else 'nobias'}{'-n1' if one else ''}"
                              for c, m, s, b, bb, one in MIXTURE_TESTS])
def test_mixture_modes_agree_with_reference(case, mode, scales, batch, bias, single):
    """Every mixing mode equals the per-sample reference (float64, 1e-12), forward and the gradients of the
    input, kernels, coefficients, biases and both kernel scales; including n = 1 (coefficients None), batch 1,
    grouped and depthwise kernels. Modes that cannot apply (outputs with a spatial scale, fused with groups)
    raise ValueError."""
    tensors, conv = _mixture_inputs(case, batch, bias, scales, single)
    if _unsupported(mode, scales, conv):
        with pytest.raises(ValueError, match="spatial|groups=1"):
            mixture_conv2d(*tensors[:4], **conv, mode=mode, spatial=tensors[4], channel=tensors[5],
                           filter=tensors[6])
        return
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in tensors]
    ref_leaves = [None if t is None else t.clone().requires_grad_(True) for t in tensors]
    with selector.exporting() if mode == "export" else contextlib.nullcontext():
        y = mixture_conv2d(*leaves[:4], **conv, mode="auto" if mode == "export" else mode, spatial=leaves[4],
                           channel=leaves[5], filter=leaves[6])
    y_ref = _mixture_reference(*ref_leaves, conv)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=0.0, atol=1e-12)
    grad_out = torch.randn_like(y_ref)
    wanted = [t for t in leaves if t is not None]
    wanted_ref = [t for t in ref_leaves if t is not None]
    for g, g_ref in zip(torch.autograd.grad(y, wanted, grad_out), torch.autograd.grad(y_ref, wanted_ref, grad_out)):
        torch.testing.assert_close(g, g_ref, rtol=0.0, atol=1e-11)


def test_fused_blocks_split_output_channels(monkeypatch):
    """The fused algorithm mixes kernels a block of output channels at a time; with tiny blocks (several,
    the last one shorter) it still equals the reference, gradients included."""
    from dynconv.functional import mixture_algorithms

    monkeypatch.setattr(mixture_algorithms, "BLOCK_ELEMENTS", 3 * 36 * 2)  # 2 channels per block at batch 3
    assert len(mixture_algorithms.channel_blocks(3, 6, 36)) == 3
    tensors, conv = _mixture_inputs("3x3", 3, True, "spatial+channel+filter", False)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    y = mixture_conv2d(*leaves[:4], **conv, mode="fused", spatial=leaves[4], channel=leaves[5], filter=leaves[6])
    y_ref = _mixture_reference(*tensors, conv)
    torch.testing.assert_close(y, y_ref, rtol=0.0, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in tensors]
    grads_ref = torch.autograd.grad(_mixture_reference(*ref_leaves, conv).square().sum(), ref_leaves)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0.0, atol=1e-11)


def test_mixture_rejects_bad_arguments():
    x, experts, coeff = torch.randn(2, 4, 5, 5), torch.randn(3, 6, 4, 3, 3), torch.rand(2, 3)
    with pytest.raises(ValueError, match="unknown mixture mode"):
        mixture_conv2d(x, experts, coeff, padding=1, mode="winograd")
    with pytest.raises(ValueError, match="single kernel"):
        mixture_conv2d(x, experts, None, padding=1)


# --------------------------------------------------------------------------------- algorithm cache

@pytest.fixture
def measured(monkeypatch):
    """Policy "measure" for every shape (tiny ones included), an empty cache, and a counting timer."""
    from dynconv.functional import selector

    calls = []

    def counting_timer():
        calls.append(1)
        return time.perf_counter()

    monkeypatch.setattr(selector, "MEASURE_MIN_MACS", 0)
    monkeypatch.setattr(selector, "DROP_FACTOR", float("inf"))  # every candidate runs every round
    monkeypatch.setattr(selector, "MEASURE_MAX_ROUNDS", selector.MEASURE_REPEATS)  # no extra rounds on noise
    monkeypatch.setattr(selector, "timer", counting_timer)
    selector.clear_cache()
    with selector.policy("measure"):
        yield calls
    selector.clear_cache()


def _conv_inputs(batch=4, size=7, groups=1, requires_grad=False):
    x, w, b, conv = _inputs("plain3x3" if groups == 1 else "groups2", batch, True)
    if requires_grad:
        x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    return x, w, b, {**conv, "groups": groups}


def test_measured_once_per_shape_then_cached(measured):
    """The first call of a shape times each candidate (one warm call, then MEASURE_REPEATS timed ones: two
    timer reads each); later calls of that shape only look the choice up; a new shape measures again."""
    from dynconv.functional import selector

    x, w, b, conv = _conv_inputs()
    y = per_sample_conv2d(x, w, b, **conv)
    per_candidate = 2 * selector.MEASURE_REPEATS
    assert len(measured) == 3 * per_candidate  # folded, bmm and loop (batch 4 <= LOOP_MAX_BATCH)
    (key, entry), = selector.choices().items()
    assert entry["algorithm"] in ("folded", "bmm", "loop") and set(entry["ms"]) == {"folded", "bmm", "loop"}
    assert "per_sample_conv2d" in key and "x4x4xpx2^5.5" in key and "infer" in key  # 49 pixels ~ 2^5.5
    torch.testing.assert_close(y, _reference(x, w, b, conv), rtol=0.0, atol=1e-12)
    for _ in range(3):
        per_sample_conv2d(x, w, b, **conv)
    assert len(measured) == 3 * per_candidate  # cached: no more timing
    per_sample_conv2d(torch.randn(4, 4, 8, 6, dtype=x.dtype), w, b, **conv)  # 48 pixels: the same size class
    assert len(measured) == 3 * per_candidate
    per_sample_conv2d(x[:, :, :6, :6], w, b, **conv)  # 36 pixels ~ 2^5: another class, another key
    assert len(measured) == 6 * per_candidate and len(selector.choices()) == 2
    x2, w2, b2, conv2 = _conv_inputs(groups=2)
    per_sample_conv2d(x2, w2, b2, **conv2)  # grouped: bmm does not apply, two candidates
    assert len(measured) == 8 * per_candidate


def test_bmm_t_is_timed_for_small_outputs_in_training_only(measured):
    """"bmm_t" differs from "bmm" only in its backward: it is a candidate for calls whose input needs a gradient,
    with groups = 1 and at most BMM_T_MAX_OUTPUT_POSITIONS output positions, and never otherwise."""
    from dynconv.functional import per_sample as per_sample_conv

    def timed(x, w, b, conv):
        per_sample_conv2d(x, w, b, **conv)
        return set(next(iter(selector.choices().values()))["ms"])

    assert timed(*_conv_inputs(requires_grad=True)) == {"folded", "bmm", "bmm_t", "loop"}  # 7x7 outputs
    selector.clear_cache()
    assert "bmm_t" not in timed(*_conv_inputs())  # inference: its forward is bmm's
    selector.clear_cache()
    assert "bmm_t" not in timed(*_conv_inputs(requires_grad=True, groups=2))
    selector.clear_cache()
    x, w, b, conv = _conv_inputs(requires_grad=True)
    big = torch.randn(4, 4, 11, 11, dtype=x.dtype, requires_grad=True)  # 121 outputs > the bound
    assert per_sample_conv.BMM_T_MAX_OUTPUT_POSITIONS < 121
    assert "bmm_t" not in timed(big, w, b, conv)


@pytest.mark.parametrize("drop_factor", [float("inf"), 2.5])
def test_fastest_candidate_is_used_and_remembered(measured, monkeypatch, drop_factor):
    """With a fake clock that makes "bmm" fastest, the cache picks bmm and every later call runs it. With a
    finite DROP_FACTOR, candidates that lost by more than that in the first round are not timed again."""
    from dynconv.functional import per_sample as per_sample_conv
    from dynconv.functional import selector

    monkeypatch.setattr(selector, "DROP_FACTOR", drop_factor)
    clock, runs = [0.0], {name: 0 for name in ("folded", "bmm", "loop")}
    cost = {"folded": 5.0, "bmm": 2.0, "loop": 9.0}
    for name, fn in list(per_sample_conv._PER_SAMPLE.items()):
        def wrapped(*args, name=name, fn=fn):
            clock[0] += cost[name]
            runs[name] += 1
            return fn(*args)
        monkeypatch.setitem(per_sample_conv._PER_SAMPLE, name, wrapped)
    monkeypatch.setattr(selector, "timer", lambda: clock[0])
    x, w, b, conv = _conv_inputs()
    per_sample_conv2d(x, w, b, **conv)
    (entry,) = selector.choices().values()
    assert entry["algorithm"] == "bmm" and entry["ms"] == {"folded": 5000.0, "bmm": 2000.0, "loop": 9000.0}
    repeats = selector.MEASURE_REPEATS
    # One warm call each, then the timed rounds (loop, 9 > 2.5 x 2, leaves after the first when dropping), then
    # the call itself with the winner.
    assert runs == {"folded": 1 + repeats, "bmm": 2 + repeats, "loop": 1 + (repeats if drop_factor > 9 else 1)}
    before = dict(runs)
    per_sample_conv2d(x, w, b, **conv)
    assert runs == {**before, "bmm": before["bmm"] + 1}


def test_measurement_leaves_the_callers_graph_alone(measured):
    """Training-mode measurement times forward + backward on detached aliases: the caller's tensors get no
    .grad from it, the result's graph is the real call's, and its gradients equal the reference's. Training
    and inference are separate keys."""
    from dynconv.functional import selector

    x, w, b, conv = _conv_inputs(requires_grad=True)
    y = per_sample_conv2d(x, w, b, **conv)
    assert x.grad is None and w.grad is None and b.grad is None
    (key,) = selector.choices()
    assert "train" in key and "grad:111" in key
    ref = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    grad_out = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, (x, w, b), grad_out),
                        torch.autograd.grad(_reference(*ref, conv), ref, grad_out)):
        torch.testing.assert_close(g, g_ref, rtol=0.0, atol=1e-12)
    with torch.no_grad():
        per_sample_conv2d(x, w, b, **conv)
    assert len(selector.choices()) == 2


def test_mixture_measures_its_modes(measured):
    """mixture_conv2d measures kernels / outputs / fused (the kernels candidate's own per-sample choice is
    measured within), caches the winner, and a spatial scale removes "outputs" from the candidates."""
    from dynconv.functional import selector

    tensors, conv = _mixture_inputs("3x3", 3, True, "none", False)
    y = mixture_conv2d(*tensors[:4], **conv)
    torch.testing.assert_close(y, _mixture_reference(*tensors, conv), rtol=0.0, atol=1e-12)
    entries = {key.split()[0]: entry for key, entry in selector.choices().items()}
    assert set(entries["mixture_conv2d"]["ms"]) == {"kernels", "outputs", "fused"}
    assert "per_sample_conv2d" in entries  # measured inside the kernels candidate's warm call
    count = len(measured)
    mixture_conv2d(*tensors[:4], **conv)
    assert len(measured) == count
    tensors, conv = _mixture_inputs("3x3", 3, True, "spatial", False)
    mixture_conv2d(*tensors[:4], **conv, spatial=tensors[4])
    spatial_key = next(key for key in selector.choices() if "spatial" in key)
    assert set(selector.choices()[spatial_key]["ms"]) == {"kernels", "fused"}
    count, entries = len(measured), len(selector.choices())
    tensors, conv = _mixture_inputs("3x3", 1, True, "spatial", False)
    mixture_conv2d(*tensors[:4], **conv, spatial=tensors[4])  # batch 1: kernels + plain conv, never timed
    assert len(measured) == count and len(selector.choices()) == entries


@pytest.mark.parametrize("policy", ["model", "folded", "loop", "bmm", "bmm_t", "kernels", "outputs", "fused"])
def test_policy_switch(measured, policy):
    """Policy "model" or a forced algorithm never times anything. A forced per-sample algorithm runs (each
    applies to every geometry, bmm to grouped kernels too), and makes mixtures mix kernels; a forced mixture mode
    runs where it applies. Results stay exact whatever the policy."""
    from dynconv.functional import per_sample as per_sample_conv
    from dynconv.functional import selector

    seen = []
    original = dict(per_sample_conv._PER_SAMPLE)
    for name, fn in original.items():
        per_sample_conv._PER_SAMPLE[name] = lambda *args, name=name, fn=fn: seen.append(name) or fn(*args)
    try:
        with selector.policy(policy):
            x, w, b, conv = _conv_inputs()
            torch.testing.assert_close(per_sample_conv2d(x, w, b, **conv), _reference(x, w, b, conv), rtol=0,
                                       atol=1e-12)
            x2, w2, b2, conv2 = _conv_inputs(groups=2)
            per_sample_conv2d(x2, w2, b2, **conv2)
            tensors, mconv = _mixture_inputs("3x3", 3, True, "none", False)
            torch.testing.assert_close(mixture_conv2d(*tensors[:4], **mconv), _mixture_reference(*tensors, mconv),
                                       rtol=0, atol=1e-12)
    finally:
        per_sample_conv._PER_SAMPLE.update(original)
    assert measured == [] and selector.choices() == {}
    if policy in ("folded", "loop", "bmm", "bmm_t"):
        assert seen == [policy, policy, policy]  # the mixture mixed kernels and ran the forced algorithm
    elif policy in ("outputs", "fused"):
        assert len(seen) == 2  # the two plain per-sample calls; the mixture ran the forced mode, no kernels


@pytest.mark.parametrize("policy", ["measure", "model", "folded", "loop", "fused", "kernels"])
def test_exporting_takes_batch_independent_algorithms(measured, monkeypatch, policy):
    """Inside selector.exporting() every call, batch 1 included (no plain-convolution shortcut), runs bmm, the
    im2col formulation whose graph holds for every batch size, whatever the policy; mixtures never run "fused"
    (its blocks are sized by the batch). Nothing is timed or cached, and the results stay exact."""
    from dynconv.functional import mixture_algorithms
    from dynconv.functional import per_sample as per_sample_conv

    seen = []
    for name, fn in dict(per_sample_conv._PER_SAMPLE).items():
        monkeypatch.setitem(per_sample_conv._PER_SAMPLE, name,
                            lambda *args, name=name, fn=fn: seen.append(name) or fn(*args))
    monkeypatch.setattr(mixture_algorithms, "by_fused", lambda *args: pytest.fail("fused ran while exporting"))
    with selector.policy(policy), selector.exporting():
        assert selector.is_exporting()
        for batch, groups in ((1, 1), (4, 1), (1, 2), (4, 2)):
            x, w, b, conv = _conv_inputs(batch=batch, groups=groups)
            torch.testing.assert_close(per_sample_conv2d(x, w, b, **conv), _reference(x, w, b, conv), rtol=0,
                                       atol=1e-12)
        for scales in ("none", "spatial"):  # 7x7 outputs, 3 experts: outputs; a spatial scale needs kernels
            tensors, mconv = _mixture_inputs("3x3", 3, True, scales, False)
            y = mixture_conv2d(*tensors[:4], **mconv, spatial=tensors[4], channel=tensors[5], filter=tensors[6])
            torch.testing.assert_close(y, _mixture_reference(*tensors, mconv), rtol=0, atol=1e-12)
    assert not selector.is_exporting()
    assert seen == ["bmm"] * 5 and measured == [] and selector.choices() == {}


def test_policy_validation_and_environment(monkeypatch):
    from dynconv.functional import selector

    with pytest.raises(ValueError, match="allowed"):
        selector.set_policy("fastest")
    monkeypatch.setenv(selector.ENV_VAR, "bmm")
    assert selector._read_env() == "bmm"
    monkeypatch.setenv(selector.ENV_VAR, "")
    assert selector._read_env() == "measure"
    monkeypatch.setenv(selector.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="DYNCONV_CONV_ALGORITHM='fastest'"):
        selector._read_env()


def test_canonical_mode_ignores_policy_and_cache(measured):
    """counting_macs forces the papers' formulation (mix kernels, folded) whatever the policy: MAC counts
    do not move, and nothing is timed."""
    from dynconv.functional import selector

    batch, experts = 4, 3
    x, w, _, conv = _inputs("plain3x3", batch, False)
    bank, coeff = w[:experts].clone(), torch.rand(batch, experts, dtype=torch.float64)
    plain = _flops(lambda: F.conv2d(x[:1], bank[0], None, conv["stride"], conv["padding"], 1, 1))
    for policy in ("measure", "bmm", "outputs", "fused"):
        with selector.policy(policy), counting_macs():
            assert _flops(lambda: per_sample_conv2d(x, w, None, **conv)) == batch * plain
            counted = _flops(lambda: mixture_conv2d(x, bank, coeff, None, conv["stride"], conv["padding"], 1, 1))
            assert counted == batch * plain + 2 * batch * experts * bank[0].numel()
    assert measured == [] and selector.choices() == {}


def test_no_measuring_under_a_dispatch_mode(measured):
    """A FlopCounterMode outside canonical mode must not count the candidates: the cost model decides."""
    x, w, _, conv = _inputs("plain3x3", 4, False)
    folded = _flops(lambda: per_sample_conv2d(x, w, None, **conv, algorithm="folded"))
    assert _flops(lambda: per_sample_conv2d(x, w, None, **conv)) == folded
    assert measured == []


def test_no_measuring_with_deterministic_algorithms(measured):
    """torch.use_deterministic_algorithms(True) (the `deterministic` option): the cost model decides, so every
    process computes the same way."""
    x, w, b, conv = _conv_inputs()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        per_sample_conv2d(x, w, b, **conv)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert measured == []


def test_compiled_call_uses_the_model_without_graph_breaks(measured):
    """Under torch.compile the choice comes from the cost model (no timing inside a traced graph), in one
    graph without breaks, and equals eager."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from dynconv.functional import selector

    def layer(x, w, experts, coeff, spatial, channel):
        y = per_sample_conv2d(x, w, None, 1, 1)
        return y + mixture_conv2d(x, experts, coeff, None, 1, 1, spatial=spatial, channel=channel)

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(3, 4, 6, 6, generator=gen), torch.randn(3, 4, 4, 3, 3, generator=gen),
            torch.randn(2, 4, 4, 3, 3, generator=gen), torch.rand(3, 2, generator=gen), torch.rand(3, 3, 3,
            generator=gen), torch.rand(3, 4, generator=gen))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter)
    out = compiled(*args)
    assert measured == [] and selector.choices() == {} and counter.frame_count == 1
    with selector.policy("model"):
        torch.testing.assert_close(out, layer(*args))
    torch._dynamo.reset()


@pytest.mark.parametrize("algorithm", ["folded", "bmm", "bmm_t", "loop"])
def test_algorithms_under_bfloat16_autocast(algorithm):
    """Under CPU autocast (bench.amp=bf16, recipe.amp=bf16) every algorithm computes in bfloat16, whatever the
    inputs' dtypes (a float32 feature map with bfloat16 kernels, as a network under autocast hands them over), and
    returns gradients in the inputs' own dtypes, close to the float32 result."""
    x, w, b, conv = _inputs("stride2", 3, True)
    x, w, b = x.float().requires_grad_(True), w.bfloat16().requires_grad_(True), b.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = per_sample_conv2d(x, w, b, **conv, algorithm=algorithm)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().square().sum(), (x, w, b))
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.float32]
    leaves = [t.detach().float().requires_grad_(True) for t in (x, w, b)]
    y_ref = _reference(*leaves, conv)
    torch.testing.assert_close(y.float(), y_ref, rtol=0.05, atol=0.2)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref.square().sum(), leaves)):
        torch.testing.assert_close(g.float(), g_ref, rtol=0.05, atol=0.05 * g_ref.abs().max().item())


@pytest.mark.parametrize("mode", ["kernels", "outputs", "fused"])
@pytest.mark.parametrize("scales", ["none", "channel+filter"])
def test_mixture_modes_under_bfloat16_autocast(mode, scales):
    """Under CPU autocast every mixture mode, the ones the selector leaves out there ("fused") included when asked
    for by name, computes in bfloat16 and returns gradients in the inputs' dtypes, close to float32."""
    tensors, conv = _mixture_inputs("3x3", 3, True, scales, False)
    leaves = [None if t is None else t.float().requires_grad_(True) for t in tensors]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixture_conv2d(*leaves[:4], **conv, mode=mode, spatial=leaves[4], channel=leaves[5], filter=leaves[6])
    assert y.dtype == torch.bfloat16
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y.float().square().sum(), wanted)
    assert all(g.dtype == torch.float32 for g in grads)
    ref_leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in leaves]
    y_ref = _mixture_reference(*ref_leaves, conv)
    torch.testing.assert_close(y.float(), y_ref, rtol=0.05, atol=0.05 * y_ref.abs().max().item())
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref.square().sum(), [t for t in ref_leaves if t is not None])):
        torch.testing.assert_close(g, g_ref, rtol=0.05, atol=0.05 * g_ref.abs().max().item())
