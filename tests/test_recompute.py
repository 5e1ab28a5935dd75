"""kernel_memory=recompute (dynconv.functional.recompute): the backward makes each layer's per-sample kernels
again instead of autograd keeping them. Same results to the bit, the kernels freed after the forward, and kept
where another saved-tensor hook or autocast is in charge."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dynconv.build import build_backbone
from dynconv.functional import mixture_conv2d, per_sample, recompute, selector
from dynconv.ops.dynet.fusion import by_kernels as dynet_by_kernels

from op_checks import load_op_config  # noqa: E402

# Every operator that materialises per-sample kernels (what "recompute" is about), with small knobs.
OPERATORS = {
    "condconv": {"experts": 3},
    "dyconv": {"kernels": 3},
    "odconv": {"kernels": 2},
    "weightnet": {},
    "kw": {"b": 1.0},
    "cgc": {},
    "dcd": {},
}


def _model(op: str) -> torch.nn.Module:
    """A tiny-input ResNet18 with every layer `op` converts."""
    torch.manual_seed(0)
    op_cfg = {**load_op_config(op), **OPERATORS[op]}
    return build_backbone({"name": "resnet18"}, op_cfg, {"name": "none"}, num_classes=5,
                          image_size=32).backbone.double().train()


def _gradients(model, x, target, policy: str, algorithm: str):
    """Loss and every gradient (parameters, then the input) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with recompute.kernel_memory(policy), selector.policy(algorithm):
        loss = F.cross_entropy(model(x), target)
        loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None] + [x.grad]


class _Calls(list):
    """The indices of the kernel views unpacked, and how many times a layer call's kernels were made again."""

    productions = 0


@pytest.fixture
def unpacks(monkeypatch):
    """How many saved kernel views the backward made again."""
    calls = _Calls()
    original = recompute._Batch.unpack

    def spy(self, recipe):
        calls.append(recipe.index)
        calls.productions += self.tensors is None  # this unpack makes the layer call's kernels again
        return original(self, recipe)

    monkeypatch.setattr(recompute._Batch, "unpack", spy)
    return calls


@pytest.mark.parametrize("algorithm", ["folded", "bmm", "bmm_t"])
@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_recomputed_kernels_give_the_same_loss_and_gradients_to_the_bit(op, algorithm, unpacks, monkeypatch):
    model = _model(op)
    convolutions = []  # every per-sample convolution the forward runs
    run = per_sample._PER_SAMPLE[algorithm]
    monkeypatch.setitem(per_sample._PER_SAMPLE, algorithm, lambda *args: convolutions.append(1) or run(*args))
    torch.manual_seed(1)
    x, target = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 4])
    kept = _gradients(model, x, target, "keep", algorithm)
    assert not unpacks
    recomputed = _gradients(model, x, target, "recompute", algorithm)
    assert unpacks.productions == len(convolutions) / 2 > 0  # (two forwards) every one's kernels made again
    assert len(kept) == len(recomputed)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)


def _mixture_inputs(batch=4, spatial=True, channel=True, groups=1, filters=False):
    torch.manual_seed(2)
    x = torch.randn(batch, 8, 7, 7, dtype=torch.float64, requires_grad=True)
    experts = torch.randn(3, 6, 8 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    coefficients = torch.randn(batch, 3, dtype=torch.float64, requires_grad=True)
    sp = torch.randn(batch, 3, 3, dtype=torch.float64, requires_grad=True) if spatial else None
    ch = torch.randn(batch, 8, dtype=torch.float64, requires_grad=True) if channel else None
    fl = torch.randn(batch, 6, dtype=torch.float64, requires_grad=True) if filters else None
    return x, experts, coefficients, sp, ch, fl


def _mixture_grads(policy, algorithm, inputs, groups=1, retain=False):
    x, experts, coefficients, sp, ch, fl = inputs
    with recompute.kernel_memory(policy), selector.policy(algorithm):
        y = mixture_conv2d(x, experts, coefficients, None, 1, 1, 1, groups, "kernels", spatial=sp, channel=ch,
                           filter=fl)
    wanted = [t for t in inputs if t is not None]
    grad = torch.randn_like(y, generator=torch.Generator().manual_seed(5))
    first = torch.autograd.grad(y, wanted, grad, retain_graph=retain)
    if retain:  # the graph run backward a second time: the kernels are made again
        second = torch.autograd.grad(y, wanted, grad)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    return [y.detach(), *first]


@pytest.mark.parametrize("algorithm", ["folded", "bmm", "bmm_t", "loop"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("spatial,channel,filters", [(False, False, False), (True, False, False), (False, True, False),
                                                     (True, True, False), (False, False, True), (True, True, True)])
def test_mixture_kernels_under_every_per_sample_algorithm(algorithm, groups, spatial, channel, filters, unpacks):
    inputs = _mixture_inputs(spatial=spatial, channel=channel, groups=groups, filters=filters)
    kept = _mixture_grads("keep", algorithm, inputs, groups)
    again = _mixture_grads("recompute", algorithm, inputs, groups, retain=True)
    assert unpacks
    assert all(torch.equal(a, b) for a, b in zip(kept, again))


def test_second_derivatives_through_recomputed_kernels(unpacks):
    """create_graph=True (a gradient penalty, say): the kernels made again in the backward keep their graph, so the
    gradient of a gradient reaches the coefficients and experts as with kept kernels."""
    inputs = _mixture_inputs(filters=True)
    results = []
    for policy in ("keep", "recompute"):
        with recompute.kernel_memory(policy), selector.policy("folded"):
            x, experts, coefficients, sp, ch, fl = inputs
            y = mixture_conv2d(x, experts, coefficients, None, 1, 1, 1, 1, "kernels", spatial=sp, channel=ch,
                               filter=fl)
        (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(grad_x.square().sum(), (experts, coefficients, sp, ch, fl)))
    assert unpacks
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_dynet_kernel_fusion_recomputed(unpacks):
    torch.manual_seed(3)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 3, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    coefficients = torch.randn(4, 8, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for policy in ("keep", "recompute"):
        with recompute.kernel_memory(policy), selector.policy("folded"):
            y = dynet_by_kernels(x, weight, coefficients, None, 1, 1, 1, 1)
        results.append([y, *torch.autograd.grad(y.square().sum(), (x, weight, coefficients))])
    assert unpacks
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("filters", [False, True])
def test_kernels_are_freed_after_the_forward_and_made_once_per_layer_in_the_backward(monkeypatch, unpacks, filters):
    """The point of it: after the forward no kernel is alive; the backward makes them once per layer call (ODConv
    saves the kernels before and after its attention scales: two views, one production) and drops them. With
    ODConv's filter scale too, nothing kernel-sized besides those two is made or kept."""
    made, original = [], recompute.recomputed

    def spying(produce, device="cpu"):
        def watched(note):
            return produce(lambda tensor: (made.append(weakref.ref(tensor)), note(tensor))[1])
        return original(watched, device)

    monkeypatch.setattr(recompute, "recomputed", spying)
    inputs = _mixture_inputs(filters=filters)
    x, experts, coefficients, sp, ch, fl = inputs
    with recompute.kernel_memory("recompute"), selector.policy("folded"):
        y = mixture_conv2d(x, experts, coefficients, None, 1, 1, 1, 1, "kernels", spatial=sp, channel=ch,
                           filter=fl)
    gc.collect()
    assert len(made) == 2 and all(ref() is None for ref in made)  # mixed and scaled, both gone
    y.sum().backward()
    assert sorted(unpacks) == [0, 1]  # both saved views made again, by one production
    gc.collect()
    assert len(made) == 4 and all(ref() is None for ref in made)  # one production of both, dropped after use


def test_filter_scale_keeps_no_extra_kernel_sized_tensor():
    """ODConv's three kernel scales in one pass: autograd keeps the mixed kernels and the scaled ones (for the
    convolution), not the kernel-sized product of the first two scales that two plain multiplications would."""
    x, experts, coefficients, sp, ch, fl = _mixture_inputs(filters=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (sizes.append(t.numel()), t)[1], lambda t: t), \
            recompute.kernel_memory("keep"), selector.policy("folded"):
        y = mixture_conv2d(x, experts, coefficients, None, 1, 1, 1, 1, "kernels", spatial=sp, channel=ch,
                           filter=fl)
    assert sizes.count(coefficients.shape[0] * experts[0].numel()) == 2, sizes
    assert y.shape == (4, 6, 7, 7)


def test_measured_choice_under_recompute_is_exact(unpacks, monkeypatch):
    """Policy measure: the selector times the mixture's algorithms (the kernels' one remaking its kernels in the
    backward, under its own `train-recompute` key) inside shielded blocks; the layer's own saved kernels are its only
    recipes, each made again once, and the results are the kept ones."""
    monkeypatch.setattr(selector, "MEASURE_MIN_MACS", 0)
    inputs = _mixture_inputs(batch=6)
    kept = _mixture_grads("keep", "folded", inputs)
    selector.clear_cache()
    with recompute.kernel_memory("recompute"), selector.policy("measure"):
        x, experts, coefficients, sp, ch, fl = inputs
        y = mixture_conv2d(x, experts, coefficients, None, 1, 1, 1, 1, "auto", spatial=sp, channel=ch,
                           filter=fl)
        timed = len(unpacks)  # the candidates' own remaking, while they were timed
        again = [y.detach(), *torch.autograd.grad(y, [t for t in inputs if t is not None],
                                                   torch.randn_like(y, generator=torch.Generator().manual_seed(5)))]
    (key, choice), = [(k, v) for k, v in selector.choices().items() if k.startswith("mixture_conv2d")]
    assert " train-recompute " in key and timed > 0
    assert sorted(unpacks[timed:]) == ([0, 1] if choice["algorithm"] == "kernels" else [])
    selector.clear_cache()
    for a, b in zip(kept, again):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # a measured algorithm may round differently


def test_kept_under_activation_checkpointing(unpacks):
    """A checkpoint decides what is saved (and must see in its recomputation what its forward saved): kernels are
    not recipes inside it, and the gradients are the plain ones."""
    inputs = _mixture_inputs()
    x, experts, coefficients, sp, ch, fl = inputs

    def layer(x):
        return mixture_conv2d(x, experts, coefficients, None, 1, 1, 1, 1, "kernels", spatial=sp, channel=ch,
                           filter=fl)

    with recompute.kernel_memory("recompute"), selector.policy("folded"):
        assert recompute.enabled(x)
        y = checkpoint(layer, x, use_reentrant=False)
        got = torch.autograd.grad(y.sum(), (x, experts))
        plain = torch.autograd.grad(layer(x).sum(), (x, experts))
    assert all(torch.equal(a, b) for a, b in zip(got, plain))


def test_autocast_recomputes_in_the_forward_precision(unpacks):
    """The backward runs outside autocast; the kernels are made again in bfloat16 as in the forward."""
    torch.manual_seed(4)
    x = torch.randn(4, 8, 7, 7, requires_grad=True)
    experts = torch.randn(3, 6, 8, 3, 3, requires_grad=True)
    coefficients = torch.softmax(torch.randn(4, 3), dim=1).requires_grad_(True)
    results = []
    for policy in ("keep", "recompute"):
        with recompute.kernel_memory(policy), selector.policy("folded"), torch.autocast("cpu", torch.bfloat16):
            y = mixture_conv2d(x, experts, coefficients, None, 1, 1, 1, 1, "kernels")
        results.append([y.float(), *torch.autograd.grad(y.float().sum(), (x, experts, coefficients))])
    assert unpacks
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_nothing_recomputed_without_gradients_or_under_keep():
    x = torch.randn(2, 3, 4, 4)
    with recompute.kernel_memory("recompute"):
        assert not recompute.enabled(x)  # nothing needs a gradient: nothing is saved
        with torch.no_grad():
            assert not recompute.enabled(x.requires_grad_(True))
        assert recompute.enabled(x)
    with recompute.kernel_memory("keep"):
        assert not recompute.enabled(x)
    with recompute.kernel_memory("auto"):  # recompute on CUDA, keep on the CPU
        assert not recompute.enabled(x)
        assert recompute.recomputes_on(torch.device("cuda", 0)) and not recompute.recomputes_on(x.device)


def test_bad_policy_names_the_allowed_values():
    with pytest.raises(ValueError, match="kernel_memory='lean'; allowed: auto, keep, recompute"):
        recompute.set_kernel_memory("lean")
