"""Checkpoint files: atomic replacement, corrupt-file errors, permissions, RNG capture/restore."""

from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
import torch

from dynconv.engine.checkpoint import (
    CorruptCheckpointError,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)


def _payload(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "epoch": int(value), "config": {"op": {"name": "condconv"}}}


class _Crash(Exception):
    pass


@pytest.mark.parametrize("error", [_Crash, KeyboardInterrupt], ids=["exception", "keyboard-interrupt"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, error):
    """A save that dies half-way (disk full, Ctrl-C, SIGKILL-like) leaves the previous last.pt intact and
    loadable, and leaves no temporary file behind in the checkpoint directory."""
    path = tmp_path / "checkpoints" / "last.pt"
    atomic_save(_payload(1.0), path)
    original_bytes = path.read_bytes()
    real_save = torch.save

    def partial_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip file")  # a few bytes reach the file, then the writer dies
        raise error("simulated crash during torch.save")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(error):
        atomic_save(_payload(2.0), path)
    monkeypatch.setattr(torch, "save", real_save)

    assert path.read_bytes() == original_bytes
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.full((64, 64), 1.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"], "temporary files were left behind"


def test_successful_save_replaces_and_cleans_up(tmp_path):
    """The counterpart: a save that succeeds replaces the content and also leaves only the target file."""
    path = tmp_path / "last.pt"
    atomic_save(_payload(1.0), path)
    atomic_save(_payload(2.0), path)
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_saved_checkpoint_loads_with_weights_only(tmp_path):
    """Checkpoints hold only plain data, so the safe `weights_only=True` loader reads them (RNG state included)."""
    path = tmp_path / "last.pt"
    atomic_save({**_payload(3.0), "rng": capture_rng_state()}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and "torch" in loaded["rng"]


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.0], ids=["half", "tenth", "empty"])
def test_truncated_file_raises_corrupt_error_with_path(tmp_path, keep):
    """A truncated checkpoint (a copy cut short, a crashed writer without atomic_save) is reported as
    CorruptCheckpointError naming the file, not an obscure zip/pickle error."""
    path = tmp_path / "run" / "last.pt"
    atomic_save(_payload(1.0), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_foreign_file_raises_corrupt_error(tmp_path):
    """A valid torch file that is not a dynconv checkpoint (no 'model' entry) is rejected with its path."""
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CorruptCheckpointError, match="weights.pt"):
        load_checkpoint(path)


def test_missing_file_raises_file_not_found(tmp_path):
    """A missing file is FileNotFoundError (not 'corrupt'), so callers can tell the two apart."""
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_permissions_follow_umask(tmp_path, umask):
    """The checkpoint gets the mode a plain open() would give (0666 & ~umask), not mkstemp's private 0600:
    a shared run directory must stay readable by the group."""
    previous = os.umask(umask)
    try:
        path = atomic_save(_payload(1.0), tmp_path / "last.pt")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~umask
    assert mode != 0o600


def _draws():
    return (torch.rand(4).tolist(), torch.randn(3).tolist(), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            random.random(), random.randint(0, 10**9))


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    """capture -> save -> load(weights_only) -> restore reproduces torch, numpy and random draws exactly,
    including numpy's cached second Gaussian (captured after an odd number of normal draws)."""
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    np.random.randn(1)  # leaves a cached Gaussian in numpy's legacy generator
    path = atomic_save({"model": {}, "rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(torch.load(path, weights_only=True)["rng"])
    assert _draws() == expected


def test_rng_restore_changes_the_generators():
    """Counterpart: without restore the draws differ (so the equality above is not trivially true)."""
    state = capture_rng_state()
    first = _draws()
    assert _draws() != first
    restore_rng_state(state)
    assert _draws() == first


def test_rng_round_trip_python_gauss():
    """random.gauss caches every second value; a resumed run must continue the same Gaussian sequence
    (timm's RandAugment draws magnitudes with random.gauss when magnitude_std > 0)."""
    random.seed(5)
    random.gauss(0.0, 1.0)  # now random holds a cached second Gaussian
    state = capture_rng_state()
    expected = [random.gauss(0.0, 1.0) for _ in range(3)]
    restore_rng_state(state)
    assert [random.gauss(0.0, 1.0) for _ in range(3)] == expected
