"""The measured choice survives a busy machine and pays for itself (dynconv/functional/selector.py,
algorithm_store.py): rounds go on while the leader is unsettled, the cost model's pick keeps a margin, a budget caps
measuring, and clean choices are stored per machine for later runs. A fake clock decides what each candidate
"costs", so the tests are exact and take no time."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dynconv.functional import algorithm_store, per_sample, per_sample_conv2d, selector


@pytest.fixture
def clock(monkeypatch, tmp_path):
    """Policy "measure" on tiny shapes, an empty cache, the store in a temporary folder, and a fake clock: each
    per-sample algorithm advances it by `cost[name]` seconds per call (`cost` may be a list: one value per call)."""
    monkeypatch.setenv(algorithm_store.ENV_VAR, str(tmp_path / "store"))
    monkeypatch.setattr(selector, "MEASURE_MIN_MACS", 0)
    monkeypatch.setattr(selector, "DROP_FACTOR", float("inf"))
    now, cost, calls = [0.0], {}, {}
    for name, fn in list(per_sample._PER_SAMPLE.items()):
        def wrapped(*args, name=name, fn=fn):
            value = cost[name]
            if isinstance(value, list):
                value = value[min(calls.get(name, 0), len(value) - 1)]
            now[0] += value
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        monkeypatch.setitem(per_sample._PER_SAMPLE, name, wrapped)
    monkeypatch.setattr(selector, "timer", lambda: now[0])
    selector.clear_cache()
    with selector.policy("measure"):
        yield cost, calls
    selector.clear_cache()


def _call(batch=4):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 7, 7, dtype=torch.float64, generator=gen)
    w = torch.randn(batch, 6, 4, 3, 3, dtype=torch.float64, generator=gen)
    return per_sample_conv2d(x, w, None, padding=1)


def _model_pick(batch=4):
    x, w = torch.zeros(batch, 4, 7, 7), torch.zeros(batch, 6, 4, 3, 3)
    return per_sample.PER_SAMPLE.cost_model((x, w, None), (1, 1, 1, 1))


def _only_choice():
    (entry,) = selector.choices().values()
    return entry


def test_a_clean_choice_is_stored_and_the_next_process_uses_it_without_timing(clock, tmp_path):
    cost, calls = clock
    cost.update(folded=5.0, bmm=2.0, loop=9.0)
    _call()
    entry = _only_choice()
    assert entry["algorithm"] == "bmm" and entry["source"] == "measured" and entry["clean"]
    assert entry["rounds"] == selector.MEASURE_REPEATS  # settled at once: no extra rounds on a quiet machine
    (stored_file,) = (tmp_path / "store").glob("cpu-*.json")
    stored = json.loads(stored_file.read_text())
    assert stored["fingerprint"]["threads"] == torch.get_num_threads()
    assert [c["algorithm"] for c in stored["choices"].values()] == ["bmm"]

    selector.clear_cache()  # a new process: nothing in memory, the file stays
    before = dict(calls)
    cost.update(folded=1.0)  # would win if measured again: the stored choice is used instead
    _call()
    assert _only_choice()["algorithm"] == "bmm" and _only_choice()["source"] == "stored"
    assert calls == {**before, "bmm": before["bmm"] + 1}  # the call itself only: nothing timed


def test_another_thread_count_is_another_machine(clock, tmp_path):
    cost, _ = clock
    cost.update(folded=5.0, bmm=2.0, loop=9.0)
    _call()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        selector.clear_cache()
        cost.update(bmm=9.0, loop=1.0)
        _call()
        assert _only_choice()["source"] == "measured" and _only_choice()["algorithm"] == "loop"
    finally:
        torch.set_num_threads(threads)
    assert len(list((tmp_path / "store").glob("cpu-*.json"))) == 2


def test_an_unsettled_measurement_takes_more_rounds_and_is_not_stored(clock, tmp_path):
    """A competing process: every timing of the leader is off by another scheduler slice, so its two best never
    agree; the choice is used by this process but a later run measures again."""
    cost, _ = clock
    cost.update(folded=[9.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5], bmm=[9.0] + [3.0, 6.0] * 5, loop=9.0)
    _call()
    entry = _only_choice()
    assert entry["rounds"] == selector.MEASURE_MAX_ROUNDS and not entry["clean"]
    assert not list((tmp_path / "store").glob("cpu-*.json"))
    assert entry["ms"] == {"folded": 1000.0, "bmm": 3000.0, "loop": 9000.0}  # the minima: noise only adds time


def test_a_leader_that_changes_is_timed_again(clock):
    cost, _ = clock
    cost.update(folded=[9.0, 1.0, 1.0, 1.0, 1.0], bmm=[9.0, 2.0, 0.5, 0.5, 0.5, 0.5], loop=9.0)
    _call()
    entry = _only_choice()
    assert entry["algorithm"] == "bmm" and entry["clean"] and entry["rounds"] == 3


def test_rounds_go_on_until_the_leaders_timings_agree(clock):
    """Settled leader, but its two best timings disagree (one lucky round) until round 5."""
    cost, _ = clock
    cost.update(folded=9.0, bmm=[1.0, 1.0, 2.0, 2.0, 2.0, 1.05, 2.0], loop=9.0)
    _call()
    entry = _only_choice()
    assert entry["algorithm"] == "bmm" and entry["clean"] and entry["rounds"] == 5


def test_the_cost_models_pick_keeps_a_margin(clock):
    cost, _ = clock
    model = _model_pick()
    others = [name for name in ("folded", "bmm", "loop") if name != model]
    cost.update({model: 1.03, others[0]: 1.0, others[1]: 5.0})  # 3% slower: noise, keep the model's pick
    _call()
    assert _only_choice()["algorithm"] == model
    selector.clear_cache()
    algorithm_store.forget()
    cost.update({model: 1.2})  # 20% slower: the measured winner replaces it
    _call(batch=5)  # another key (the store holds batch 4's)
    assert [e["algorithm"] for e in selector.choices().values()] == [others[0]]


def test_measuring_stops_at_its_budget(clock, monkeypatch, tmp_path):
    cost, calls = clock
    cost.update(folded=5.0, bmm=2.0, loop=9.0)
    monkeypatch.setattr(selector, "MEASURE_BUDGET_S", 0.0)
    _call()
    (entry,) = selector.choices().values()  # the cost model's pick, untimed, kept for this process only
    assert entry["algorithm"] == _model_pick() and entry["source"] == "budget" and entry["ms"] == {}
    assert sum(calls.values()) == 1
    _call()
    assert sum(calls.values()) == 2  # later calls look it up: still nothing timed
    assert not list((tmp_path / "store").glob("cpu-*.json"))


def test_a_corrupt_store_is_named_and_rewritten(clock, tmp_path):
    cost, _ = clock
    cost.update(folded=5.0, bmm=2.0, loop=9.0)
    _call()
    (stored_file,) = (tmp_path / "store").glob("cpu-*.json")
    stored_file.write_text("{not json")
    selector.clear_cache()
    with pytest.warns(UserWarning, match=f"{stored_file}.*corrupt"):
        _call()
    assert _only_choice()["source"] == "measured"
    assert json.loads(stored_file.read_text())["choices"]  # valid again


def test_an_unwritable_store_warns_once_and_the_run_goes_on(clock, tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(algorithm_store.ENV_VAR, str(blocker / "store"))  # a folder under a file: cannot be made
    cost, _ = clock
    cost.update(folded=5.0, bmm=2.0, loop=9.0)
    with pytest.warns(UserWarning, match="cannot be written"):
        _call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(batch=5)
    assert len(selector.choices()) == 2


@pytest.mark.parametrize("value", ["off", "OFF", "0", "none"])
def test_the_store_can_be_turned_off(monkeypatch, value):
    monkeypatch.setenv(algorithm_store.ENV_VAR, value)
    assert algorithm_store.folder() is None and algorithm_store.path_for(torch.device("cpu")) is None


def test_the_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(algorithm_store.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert algorithm_store.folder() == tmp_path / "dynconv" / "conv_algorithms"
