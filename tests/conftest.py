"""Shared fixtures for the engine / CLI tests.

- `data_dir` (session): one temporary DYNCONV_DATA_DIR for the whole session, so the digits ImageFolder is
  written once and every `train.py` subprocess reuses it instead of touching the checkout's `data/`.
- `run_train` / `train_env`: run `train.py` (or `torchrun train.py`) from the repository root with a clean,
  hermetic environment and parse the last stdout line as the result JSON.
- `compose_cfg`: compose `configs/train.yaml` in-process, lightning-hydra-template style.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

# Every test measures for itself: no conv-algorithm choice stored by an earlier run (or by another test) on this
# machine is read, and nothing is written to the user's cache (dynconv/functional/algorithm_store.py). Set before
# dynconv is imported; subprocesses inherit it. The store's own tests point it at a temporary folder.
os.environ["DYNCONV_ALGORITHM_CACHE"] = "off"
os.environ.pop("DYNCONV_MEASURE_BUDGET_S", None)
os.environ.pop("DYNCONV_KERNEL_MEMORY", None)  # the default policy ("auto") unless a test sets one

# Under pytest-xdist (pyproject's addopts: two workers on CI's two cores) each worker and the processes it starts
# compute on one thread: two workers with two threads each on two cores make every parallel region wait for a
# descheduled thread (oneDNN/OpenMP spin-waits), which ran some tests several times slower than serially.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
TRAIN_PY = REPO / "train.py"

def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is not glibc (macOS, musl: nothing to trim)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


@pytest.fixture(autouse=True)
def _return_freed_memory_after_each_test():
    """Hand the memory of freed tensors back to the OS after every test (0.3 ms). The suite builds thousands of
    models in one process, and glibc keeps freed blocks in its arenas: without this the process kept the
    fragmented high-water mark of every model built so far, and a 2-core, 24 GiB CI machine ran out of memory
    (the pytest process at 20 GB, in the backbone x operator matrix)."""
    yield
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@pytest.fixture(autouse=True, scope="module")
def _collect_cycles_after_each_module():
    """Models that point to themselves (hooks, parametrizations) wait for a full collection (0.2 s: once per
    module, not per test); then their memory goes back to the OS too."""
    yield
    import gc

    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_FAILED_MODULES: set[str] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        _FAILED_MODULES.add(item.module.__name__)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Callable[[str], Path]:
    """`tmp_path_factory.mktemp` for module-scoped fixtures, removed when the module's tests all passed.

    Why: pytest's "failed" retention policy (pyproject.toml) removes a passing test's `tmp_path` at once but keeps
    what module fixtures made until the session ends, and the run folders here hold ResNet18 checkpoints
    (~180 MB each with optimizer state): kept, they filled a CI machine's disk (ENOSPC in the checkpoint writer).
    A module with a failure keeps its folders for inspection."""
    import shutil

    made: list[Path] = []

    def mktemp(name: str) -> Path:
        path = tmp_path_factory.mktemp(name)
        made.append(path)
        return path

    yield mktemp
    if request.module.__name__ not in _FAILED_MODULES:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


# The fastest settings that still exercise the whole pipeline (loaders, train loop, eval, checkpoints).
SMOKE = [
    "data.max_train_samples=128",
    "data.max_val_samples=64",
    "data.num_workers=0",
    "recipe.batch_size=32",
    "recipe.epochs=2",
    "log.progress_bar=false",
    # The cost model instead of timing the per-sample convolution algorithms: a two-epoch run has nothing to gain
    # from measuring (13 s of a 23 s CondConv run). The measured policy has its own run: test_train_cli.py.
    "conv_algorithm=model",
]
CONDCONV2 = ["op=condconv", "op.experts=2"]

# Variables that would make a subprocess behave like part of someone else's launch.
_LEAKY_ENV = (
    "DYNCONV_OUTPUT_DIR", "DYNCONV_RUN_NAME", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK",
    "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID",
    "SUBMITIT_EXECUTOR", "HYDRA_FULL_ERROR", "IMAGENET_DIR", "DYNCONV_CONV_ALGORITHM", "DYNCONV_KERNEL_MEMORY",
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A session-wide DYNCONV_DATA_DIR with the digits tree already written (once, before any subprocess)."""
    from dynconv.tasks.classification.digits import ensure_digits_imagefolder

    root = tmp_path_factory.mktemp("dynconv-data")
    ensure_digits_imagefolder(root / "digits", image_size=32)
    return root


@pytest.fixture(scope="session")
def train_env(data_dir) -> Callable[..., dict[str, str]]:
    """Build a subprocess environment: the inherited one minus launcher variables, plus DYNCONV_DATA_DIR."""

    def make(extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _LEAKY_ENV}
        env["DYNCONV_DATA_DIR"] = str(data_dir)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    return make


def last_json_line(stdout: str) -> dict[str, Any] | None:
    """The result JSON: train.py's contract is that it is the last non-empty stdout line."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def train_command(args: Sequence[str], tmp_path: Path | None, *, launcher: Sequence[str] | None = None) -> list[str]:
    """`python train.py args` (or `python -m <launcher> train.py args`); hydra.run.dir defaults to tmp_path/run."""
    args = [str(a) for a in args]
    multirun = "-m" in args or "--multirun" in args
    if tmp_path is not None and not multirun and not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    return [sys.executable, *(launcher or []), str(TRAIN_PY), *args]


@pytest.fixture(scope="session")
def run_train(train_env) -> Callable[..., tuple[subprocess.CompletedProcess, dict[str, Any] | None]]:
    """run_train(args, tmp_path, env=None, timeout=300, launcher=None) -> (completed process, last-line JSON).

    Runs from the repository root with `sys.executable`. `tmp_path=None` leaves hydra.run.dir unset.
    """

    def run(args, tmp_path, env=None, timeout=300, launcher=None):
        completed = subprocess.run(
            train_command(args, tmp_path, launcher=launcher),
            cwd=REPO,
            env=train_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return completed, last_json_line(completed.stdout)

    return run


def describe(completed: subprocess.CompletedProcess) -> str:
    """Assertion context: the exit code and the tails of both streams."""
    return f"exit {completed.returncode}\n--- stdout ---\n{completed.stdout[-3000:]}\n--- stderr ---\n{completed.stderr[-3000:]}"


@pytest.fixture
def compose_cfg():
    """compose_cfg(overrides=(), return_hydra_config=False) -> DictConfig of configs/train.yaml."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dynconv.config import register_resolvers

    register_resolvers()

    def make(overrides: Sequence[str] = (), return_hydra_config: bool = False, config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            return compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: on two shared cores, two threads spin-wait on each other and small
    models run several times slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ the default run's size
# Tests that `slow` joins at collection, so that the default run (pyproject's addopts: `-m 'not slow'`, with the
# campaigns and the export matrix) fits CI's 30 minutes on the slowest 2-core machine it draws. Measured there
# (2026-12-05, AVX2-only AMD EPYC, `--junitxml` times): the whole suite took 4,872 test-seconds, 41.5 minutes in two
# workers; these took about 1,880 of them, every `slow` test together 2,330, and the default run is left with
# about 2,550. Each capability keeps a cheaper test in the default run (the matrix keeps
# its light backbones and, on the heavy ones, KernelWarehouse and CondConv; export keeps CondConv and ODConv layers;
# resume keeps one bitwise-equal extension and Ctrl-C's resume). `python -m pytest -q -m "not campaign and not
# matrix"` runs them too.
SLOW_ON_CI = (
    "tests/test_models.py::test_one_training_step[vgg19_cifar-*]",
    "tests/test_models.py::test_one_training_step[wide_resnet50_2-*]",
    "tests/test_models.py::test_one_training_step[resnext50_32x4d-*]",
    "tests/test_models.py::test_one_training_step[resnet50-*]",
    "tests/test_models.py::test_one_training_step[resnet152-*]",
    "tests/test_models.py::test_one_training_step[convnext_tiny-*]",
    "tests/test_models.py::test_one_training_step[mobilenetv3_large-*]",
    "tests/test_models.py::test_one_training_step[deit_small-*]",
    "tests/test_models.py::test_one_training_step[dynet_resnet50-*]",
    # Width variants of a network the matrix trains at another width (the same code path, other channel counts).
    "tests/test_models.py::test_one_training_step[shufflenetv2_x0_5-*]",
    "tests/test_models.py::test_one_training_step[shufflenetv2_x1_5-*]",
    "tests/test_models.py::test_one_training_step[shufflenetv2_x2_0-*]",
    "tests/test_models.py::test_one_training_step[shufflenetv2_wn_x0_5-*]",
    "tests/test_models.py::test_one_training_step[shufflenetv2_wn_x1_5-*]",
    "tests/test_models.py::test_one_training_step[shufflenetv2_wn_x2_0-*]",
    "tests/test_models.py::test_one_training_step[mobilenetv2_050-*]",
    "tests/test_models.py::test_one_training_step[mobilenetv2_060-*]",
    "tests/test_models.py::test_one_training_step[mobilenetv2_075-*]",
    "tests/test_models.py::test_one_training_step[dynet_shuffle_x1_5-*]",
    "tests/test_export.py::test_operator_layers_export_with_a_dynamic_batch[*]",
    "tests/test_export.py::test_mobilenetv2_condconv_exports_to_onnx",
    "tests/test_export.py::test_resnet18_kw_exports_with_torch_export",
    "tests/test_reproduction_tables.py::test_every_launch_command_composes_and_its_model_builds",
    "tests/test_reproduction_tables.py::test_a_fine_tuning_row_starts_from_a_checkpoint_of_its_own_backbone",
    "tests/test_docs_commands.py::*",
    "tests/test_resume.py::test_extending_a_finished_run_equals_an_uninterrupted_run[step-workers2]",
    "tests/test_config_fuzz.py::test_every_case_passes_or_is_refused_by_name",
    "tests/test_bad_input.py::test_unknown_group_option_lists_available_options[group-backbone]",
    "tests/test_api.py::test_the_docs_notebook_walk_through_runs",
    "tests/test_auto_resume.py::test_the_same_command_finds_its_run_again_and_resume_never_starts_a_new_one",
    "tests/test_attention.py::test_matrix_forward_backward[*]",
    "tests/test_attention.py::test_every_operator_batch_one_train_mode[*]",
    "tests/test_dilated_operators.py::test_operator_on_dilated_backbone_equals_per_sample_reference[*]",
    "tests/test_bench_suites.py::test_every_suite_plans[*]",
    "tests/test_detection_models.py::test_train_step_every_operator[*]",
    "tests/test_install.py::test_train_and_eval_run_from_any_folder",
    "tests/test_weight_excitation.py::test_folding_gives_the_baseline_model_with_the_same_outputs[*]",
    "tests/test_compose.py::test_validate_model_config_accepts_every_backbone_and_op[*]",
    "tests/test_selector.py::test_mac_count_is_the_same_under_every_policy[*]",
    "tests/test_convert_any.py::test_every_operator_trains_a_step[*]",
)
# Kept in the default run although a pattern above names them: one representative of each capability.
KEPT_ON_CI = (
    "tests/test_models.py::test_one_training_step[*-kw]",
    "tests/test_models.py::test_one_training_step[*-condconv]",
    "tests/test_export.py::test_operator_layers_export_with_a_dynamic_batch[condconv]",
    "tests/test_export.py::test_operator_layers_export_with_a_dynamic_batch[odconv]",
    "tests/test_attention.py::test_matrix_forward_backward[resnet18-*]",
    "tests/test_dilated_operators.py::test_operator_on_dilated_backbone_equals_per_sample_reference[*odconv*]",
    "tests/test_convert_any.py::test_every_operator_trains_a_step[*kw*]",
    "tests/test_detection_models.py::test_train_step_every_operator[*condconv*]",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marks
def pytest_collection_modifyitems(config, items):
    import fnmatch

    def matches(nodeid: str, patterns) -> bool:  # "[" starts a parameter id here, not a character class
        return any(fnmatch.fnmatchcase(nodeid, pattern.replace("[", "[[]")) for pattern in patterns)

    for item in items:
        if matches(item.nodeid, SLOW_ON_CI) and not matches(item.nodeid, KEPT_ON_CI):
            item.add_marker(pytest.mark.slow)
