"""An install that is not a checkout (issue 17): the wheel built from this tree carries the configs (the same files
as the top-level configs/, one source), and its entry points train and evaluate from a folder that is not the
clone: `python -m dynconv.train`, the `dynconv-eval` console script, the Python API."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, describe, last_json_line

# What a clone holds beside the sources (top level: run outputs, datasets, environments): never part of a build.
TOP_LEVEL_NOT_SOURCES = {".git", ".venv", ".ci-venv", "outputs", "multirun", "data", "results", "build",
                         ".pytest_cache"}


def not_sources(folder: str, names: list[str]) -> set[str]:
    top = Path(folder) == REPO
    return {name for name in names if (top and name in TOP_LEVEL_NOT_SOURCES) or name == "__pycache__"
            or name.endswith(".egg-info") or (Path(folder) == REPO / "configs" and name == "local")}


@pytest.fixture(scope="module")
def installed(module_tmp):
    """The wheel of a copy of this tree (the copy keeps the clone free of build/ and egg-info), installed into a
    folder of its own; returns (install folder, environment that imports dynconv from there only)."""
    root = module_tmp("install")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=not_sources)
    wheels = root / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(source), "-w", str(wheels)]
    if importlib.util.find_spec("setuptools") is not None:
        build.insert(-4, "--no-build-isolation")  # else pip fetches setuptools from the package index
    completed = subprocess.run(build, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, describe(completed)
    (wheel,) = wheels.glob("dynconv-*.whl")
    target = root / "site"
    completed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, describe(completed)
    # PYTHONPATH comes before the editable install of this clone, so `import dynconv` finds the installed copy.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "DYNCONV_OUTPUT_DIR")}
    env.update(PYTHONPATH=str(target), DYNCONV_DATA_DIR=str(root / "data"), PYTHONUNBUFFERED="1")
    return target, env


def test_the_wheel_ships_the_top_level_configs_tree(installed):
    target, _ = installed
    shipped = target / "dynconv" / "configs"
    repo_files = sorted(p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml")
                        if p.parts[len((REPO / "configs").parts)] != "local")
    shipped_files = sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml"))
    assert shipped_files == repo_files and len(repo_files) > 100
    _, mismatch, errors = filecmp.cmpfiles(REPO / "configs", shipped, [str(p) for p in repo_files], shallow=False)
    assert not mismatch and not errors
    tables = target / "dynconv" / "reproduction" / "tables"
    assert sorted(p.name for p in tables.glob("*.yaml")) == sorted(
        p.name for p in (REPO / "dynconv" / "reproduction" / "tables").glob("*.yaml"))
    assert {"dynconv-train", "dynconv-eval"} <= {p.name for p in (target / "bin").iterdir()}


def test_train_and_eval_run_from_any_folder(installed, tmp_path):
    target, env = installed
    completed = subprocess.run(
        [sys.executable, "-c", "import dynconv, dynconv.paths as p; print(dynconv.__file__, p.CONFIG_DIR, "
         "p.CHECKOUT_DIR, 'kw' in dynconv.options('op'))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, describe(completed)
    module_file, config_dir, checkout, has_kw = completed.stdout.split()
    assert Path(module_file).is_relative_to(target) and Path(config_dir) == target / "dynconv" / "configs"
    assert checkout == "None" and has_kw == "True"

    train = subprocess.run(
        [sys.executable, "-m", "dynconv.train", "op=static", "data.max_train_samples=64", "data.max_val_samples=32",
         "data.num_workers=0", "recipe.batch_size=32", "recipe.epochs=1", "log.progress_bar=false",
         "conv_algorithm=model"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, describe(train)
    result = last_json_line(train.stdout)
    run_dir = Path(result["run_dir"])
    assert result["status"] == "completed" and run_dir.is_relative_to(tmp_path / "outputs")
    assert result["run"]["git_commit"] is None  # not a checkout: no commit to record

    evaluated = subprocess.run([sys.executable, str(target / "bin" / "dynconv-eval"), f"checkpoint={run_dir}",
                                "data.num_workers=0"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, describe(evaluated)
    scored = last_json_line(evaluated.stdout)
    assert scored["samples"] == 32 and scored["top1"] == pytest.approx(result["top1"])
