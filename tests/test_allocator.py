"""dynconv/allocator.py: glibc keeps large freed buffers (train.py and scripts/bench.py apply it), and a bad
DYNCONV_MALLOC stops train.py before anything runs, naming the variable and the allowed values."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from dynconv import allocator

GLIBC = True
try:
    ctypes.CDLL("libc.so.6").mallopt
except (OSError, AttributeError):
    GLIBC = False


def _in_fresh_process(code: str, env_value: str | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env[allocator.ENV_VAR] = env_value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=False).stdout.strip() or "error"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_retain_is_the_default_and_applies_once():
    assert _in_fresh_process("from dynconv import allocator; print(allocator.apply(), allocator.apply())") \
        == "retain retain"


def test_default_leaves_glibc_alone():
    assert _in_fresh_process("from dynconv import allocator; print(allocator.apply())", "default") == "default"


def test_a_bad_value_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"DYNCONV_MALLOC='huge' is invalid; allowed values: retain, default"):
        allocator.apply("huge")


def test_train_py_refuses_a_bad_value_before_anything_runs(run_train, tmp_path):
    completed, _ = run_train(["data.max_train_samples=8"], tmp_path, env={allocator.ENV_VAR: "x"})
    assert completed.returncode == 2 and "DYNCONV_MALLOC='x' is invalid" in completed.stderr
    assert not (tmp_path / "run").exists()
