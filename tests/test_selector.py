"""The one algorithm selector (dynconv.functional.selector): its precedence, its cache, and that MAC counting
never depends on the policy, for every operator."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dynconv.build import build_backbone
from dynconv.functional import selector
from dynconv.ops import OPERATORS
from dynconv.profiling import count_macs
from op_checks import load_op_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORCED_POLICIES = [policy for policy in selector.POLICIES if policy != "measure"]


class FakeRoutine(selector.Routine):
    """Two algorithms, "a" (canonical, the cost model's) and "b"; counts what the selector asks of it."""

    name = "fake"
    algorithms = ("a", "b")
    canonical = "a"
    forced = {"folded": "b", "bmm": "b"}
    batch_free = ("b",)  # what an export records

    def __init__(self, b_applies: bool = True):
        self.b_applies = b_applies
        self.calls = {"cost_model": 0, "timed": 0, "run": 0, "shape_key": 0}

    def applicable(self, algorithm, tensors, params):
        return algorithm == "a" or self.b_applies

    def cost_model(self, tensors, params):
        self.calls["cost_model"] += 1
        return "a"

    def macs(self, tensors, params):
        return 1 << 30

    def timed(self, tensors, params):
        self.calls["timed"] += 1
        return ["a", "b"] if self.b_applies else ["a"]

    def shape_key(self, tensors, params):
        self.calls["shape_key"] += 1
        return selector.conv_shape_key(tensors[0], tensors[1].shape, 1, 0, 1, 1)

    def run(self, algorithm, tensors, params):
        self.calls["run"] += 1
        x, weight = tensors
        return x * 1.0 + weight.sum()


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock that makes "b" 3 ms and "a" 5 ms per call: "b" wins any measurement."""
    clock, original = [0.0], FakeRoutine.run

    def run(self, algorithm, tensors, params):
        clock[0] += 0.003 if algorithm == "b" else 0.005
        return original(self, algorithm, tensors, params)

    monkeypatch.setattr(FakeRoutine, "run", run)
    monkeypatch.setattr(selector, "timer", lambda: clock[0])
    selector.clear_cache()
    yield
    selector.clear_cache()


def _tensors(batch=4):
    return torch.randn(batch, 3, 8, 8), torch.randn(2, 3)


def test_precedence(fake_clock):
    """counting > forced policy > no timing (model policy, a forced policy that does not apply here) > batch 1 >
    the measured cache > measuring."""
    routine, tensors = FakeRoutine(), _tensors()
    with selector.policy("folded"), selector.counting_macs():
        assert selector.select(routine, tensors, None) == "a"  # counting: the canonical, even when forced
    with selector.policy("folded"):
        assert selector.select(routine, tensors, None) == "b"  # forced, and it applies
        assert selector.select(FakeRoutine(b_applies=False), tensors, None) == "a"  # does not apply: cost model
    with selector.policy("cells"):
        assert selector.select(routine, tensors, None) == "a"  # a policy of another routine: the cost model
    with selector.policy("model"):
        assert selector.select(routine, tensors, None) == "a"
    with selector.policy("measure"):
        assert selector.select(routine, _tensors(batch=1), None) == "a"  # batch 1: never timed
        assert selector.choices() == {}
        assert selector.select(routine, tensors, None) == "b"  # measured: "b" is faster
        (entry,) = selector.choices().values()
        assert entry == {"algorithm": "b", "ms": {"a": 5.0, "b": 3.0}, "source": "measured",
                         "rounds": selector.MEASURE_REPEATS, "clean": True}


def test_exporting_comes_after_counting_and_before_any_policy(fake_clock):
    """Inside exporting() the routine's batch-independent algorithm runs at every batch size (batch 1 too) and
    under every policy, nothing is timed; only MAC counting comes first. A routine that declares none says so."""
    routine = FakeRoutine()
    with selector.exporting():
        for policy in ("measure", "model", "folded", "cells"):
            with selector.policy(policy):
                for batch in (1, 4):
                    assert selector.select(routine, _tensors(batch), None) == "b", (policy, batch)
        with selector.counting_macs():
            assert selector.select(routine, _tensors(), None) == "a"
        with pytest.raises(ValueError, match="fake: none of its batch-independent algorithms"):
            selector.select(FakeRoutine(b_applies=False), _tensors(), None)
    assert routine.calls["timed"] == routine.calls["cost_model"] == 0 and selector.choices() == {}
    assert not selector.is_exporting()


def test_torch_export_is_detected_without_the_context_manager():
    """torch.export (what torch.onnx's exporter runs) and torch.jit tracing are export mode by themselves; an
    eager call is not."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(selector.is_exporting())
            return x + 1

    x = torch.randn(2, 3)
    torch.export.export(Probe(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.jit.trace(Probe(), (x,), check_trace=False)  # the check would re-run it eagerly
    Probe()(x)
    assert seen == [True, True, False]


def test_cache_is_looked_up_before_any_candidate_is_built(fake_clock):
    routine, tensors = FakeRoutine(), _tensors()
    with selector.policy("measure"):
        selector.select(routine, tensors, None)
        before = dict(routine.calls)
        for _ in range(5):
            assert selector.select(routine, tensors, None) == "b"
    after = routine.calls
    assert after["shape_key"] == before["shape_key"] + 5  # the key, and nothing else
    assert (after["timed"], after["run"], after["cost_model"]) == (before["timed"], before["run"], before["cost_model"])


def test_key_description_reads_like_the_shape(fake_clock):
    routine = FakeRoutine()
    with selector.policy("measure"):
        selector.select(routine, _tensors(), None)
    (key,) = selector.choices()
    assert key == "fake cpu float32 infer grad:00 x4x3xpx2^6 w2x3 s1x1 p0x0 d1x1 g1"


def _op_config(name: str) -> dict:
    small = {"condconv": {"experts": 2}, "dyconv": {"kernels": 2}, "odconv": {"kernels": 2}, "dynet": {"g": 2},
             "weightnet": {"G": 1}}
    return {**load_op_config(name), **small.get(name, {})}


@pytest.mark.parametrize("op", OPERATORS.names())
def test_mac_count_is_the_same_under_every_policy(op):
    """count_macs evaluates the papers' formulation whatever the policy (counting comes first): forcing any
    algorithm, or the cost model, never changes a count."""
    torch.manual_seed(0)
    model = build_backbone({"name": "resnet18"}, _op_config(op), {"name": "none"}, num_classes=10,
                           image_size=64).backbone
    with selector.policy("measure"):
        default = count_macs(model, (3, 64, 64)).total
    for policy in FORCED_POLICIES:
        with selector.policy(policy):
            assert count_macs(model, (3, 64, 64)).total == default, policy


def test_profile_script_counts_kw_the_same_with_a_forced_policy():
    """The issue's reproduction: `DYNCONV_CONV_ALGORITHM=cells python scripts/profile.py backbone=resnet18 op=kw`
    counted the "cells" path; it must print the MACs of the default policy."""
    env = {**os.environ, "DYNCONV_CONV_ALGORITHM": "cells", "OMP_NUM_THREADS": "1"}
    args = ["backbone=resnet18", "op=kw", "profile.resolution=64"]
    completed = subprocess.run([sys.executable, "scripts/profile.py", *args], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    forced = json.loads(completed.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    model = build_backbone({"name": "resnet18"}, load_op_config("kw"), {"name": "none"}, num_classes=1000,
                           image_size=64).backbone
    with selector.policy("measure"):
        assert forced["macs"] == count_macs(model, (3, 64, 64)).total


def test_candidates_that_all_fail_leave_the_cost_model(fake_clock, monkeypatch):
    """A candidate that raises (CUDA out of memory, say) is dropped; when none runs, the cost model decides."""
    def fail(self, algorithm, tensors, params):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(FakeRoutine, "run", fail)
    with selector.policy("measure"):
        assert selector.select(FakeRoutine(), _tensors(), None) == "a"
    (entry,) = selector.choices().values()
    assert entry == {"algorithm": "a", "ms": {}, "source": "measured", "rounds": 0, "clean": False}
