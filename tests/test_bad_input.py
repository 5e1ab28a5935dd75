"""Rejected configs fail fast (exit 2, one `error:` line naming the key, the value and what is allowed) and
leave no run directory behind; a rejected resume never touches the run it refers to.

All invalid invocations are independent, so they run concurrently (3 at a time) in one module fixture: each
costs ~5 s of imports and nothing else.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONDCONV2, REPO, SMOKE, describe, train_command

# name -> (overrides, substrings stderr must contain). These run as real `train.py` subprocesses; the
# remaining validation cases are checked in-process at the end of this file (same code path, no 5 s imports).
GROUP_CASES = {
    "group-backbone": (["backbone=resnet19"], ["resnet19", "resnet18", "resnet50"]),
}
KEY_CASES = {
    "key-backbone": (["backbone.name=resnet19"], ["resnet19", "resnet18", "resnet50", "wide_resnet50_2"]),
}
KEY_NAMES = {"key-backbone": "backbone.name"}
VALUE_CASES = {
    "experts-zero": (["op=condconv", "op.experts=0"], ["op.experts", "0", "integers >= 1"]),
    # A knob that is valid on its own but does not fit a layer: found by the meta-device dry build.
    "weightnet-g-misfit": (["op=weightnet", "op.G=5"], ["op.G=5", "layer1.0.conv1", "Conv2d(64->64", "allowed"]),
    # KernelWarehouse: half-divisor cells of ConvNeXt's 3-channel stem, and whole-kernel cells across shapes.
    "kw-budget-no-whole-cell": (["op=kw", "op.b=1/2", "backbone=convnext_tiny"],
                                ["op.b", "1/2", "stem.0", "4x4x3x96", "divisor 3"]),
    "kw-no-common-cell": (["op=kw", "op.partition=false"],
                          ["op.partition=false", "layer2.0.conv1", "3x3x64x128", "op.sharing_dims=same"]),
    "kw-mixed-budget-resnet": (["op=kw", "op.b=0.75"], ["op.b=3/4", "resnet18", "1/4, 1/2, 1, 2, 4"]),
    "imagefolder-missing-root": (["data=imagefolder", "data.root=/nonexistent/x"],
                                 ["data.root", "/nonexistent/x", "train/", "val/"]),
    "sched": (["recipe.sched=foo"], ["recipe.sched", "foo", "cosine", "step", "multistep", "linear", "none"]),
}
GARBAGE = b"this is not a checkpoint\x00\x01\x02" * 100


def _execute(args, run_dir: Path | None, env):
    run_dir_arg = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    return subprocess.run(train_command([*args, *run_dir_arg], None), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def outcomes(train_env, module_tmp):
    """Run every invalid invocation (plus the first, valid half of the changed-model case) concurrently."""
    root = module_tmp("bad-input")
    garbage = root / "garbage.pt"
    garbage.write_bytes(GARBAGE)
    cases = {**GROUP_CASES, **KEY_CASES, **VALUE_CASES,
             "resume-garbage": ([f"resume={garbage}"], [str(garbage)])}
    smoke = [*SMOKE, "recipe.epochs=1"]
    env = train_env({"OMP_NUM_THREADS": "1"})
    jobs = {name: ([*smoke, *args], root / name / "run") for name, (args, _) in cases.items()}
    jobs["changed-model-first"] = ([*CONDCONV2, *smoke], root / "changed-model" / "run")
    # The default run dir (no hydra.run.dir): DYNCONV_OUTPUT_DIR/<date>/<time>, both levels made by Hydra.
    jobs["default-run-dir"] = ([*smoke, "op=condconv", "op.experts=0"], root / "default-run-dir" / "outputs")
    envs = {name: env for name in jobs}
    envs["default-run-dir"] = {**env, "DYNCONV_OUTPUT_DIR": str(jobs["default-run-dir"][1])}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_execute, args, None if name == "default-run-dir" else run_dir, envs[name])
                   for name, (args, run_dir) in jobs.items()}
        results = {name: future.result() for name, future in futures.items()}
    return {name: (results[name], jobs[name][1], cases.get(name, (None, []))[1]) for name in jobs}


def _assert_no_run_dir(run_dir: Path) -> None:
    assert not run_dir.exists() or not any(run_dir.iterdir()), f"left behind: {sorted(run_dir.rglob('*'))}"


@pytest.mark.parametrize("case", sorted(GROUP_CASES))
def test_unknown_group_option_lists_available_options(outcomes, case):
    """`group=typo` is caught by Hydra itself: non-zero exit, its message lists the group's options."""
    completed, run_dir, expected = outcomes[case]
    assert completed.returncode != 0, describe(completed)
    for text in expected:
        assert text in completed.stderr, f"{text!r} missing:\n{describe(completed)}"
    _assert_no_run_dir(run_dir)


@pytest.mark.parametrize("case", sorted(KEY_CASES) + sorted(VALUE_CASES) + ["resume-garbage"])
def test_invalid_value_exits_2_with_message_and_no_run_dir(outcomes, case):
    """Invalid names and values are rejected before anything is written: exit 2, a single `error:` line (no
    traceback) that contains the offending value and the allowed values, and no (or an empty) run dir."""
    completed, run_dir, expected = outcomes[case]
    assert completed.returncode == 2, describe(completed)
    assert "error:" in completed.stderr, describe(completed)
    assert "Traceback" not in completed.stderr, describe(completed)
    for text in expected:
        assert text in completed.stderr, f"{text!r} missing:\n{describe(completed)}"
    assert completed.stdout.strip() == "" or "{" not in completed.stdout.splitlines()[-1], "printed a result JSON"
    _assert_no_run_dir(run_dir)


@pytest.mark.parametrize("case", sorted(KEY_CASES))
def test_unknown_name_error_names_the_key(outcomes, case):
    """`backbone.name=resnet19` must be answered with the key the user set (`backbone.name=`), so the message
    says exactly what to change, plus how to select by group (`backbone=NAME`)."""
    completed, _, _ = outcomes[case]
    assert completed.returncode == 2, describe(completed)
    assert f"{KEY_NAMES[case]}=" in completed.stderr, describe(completed)
    assert f"{KEY_NAMES[case].split('.')[0]}=NAME" in completed.stderr, describe(completed)


def test_rejected_config_leaves_no_empty_dirs_under_default_output_root(outcomes):
    """Without hydra.run.dir, a rejected config leaves nothing under DYNCONV_OUTPUT_DIR: repeated typos must
    not litter outputs/ with empty date folders (the root itself may exist)."""
    completed, output_root, _ = outcomes["default-run-dir"]
    assert completed.returncode == 2, describe(completed)
    assert "op.experts" in completed.stderr
    leftovers = sorted(p.relative_to(output_root).as_posix() for p in output_root.rglob("*")) \
        if output_root.exists() else []
    assert leftovers == [], f"left under {output_root}: {leftovers}"


def test_corrupt_resume_file_names_the_path(outcomes):
    """A garbage `resume=` file is reported as unreadable with its path (not a raw unpickling traceback)."""
    completed, _, _ = outcomes["resume-garbage"]
    assert completed.returncode == 2, describe(completed)
    assert "cannot read checkpoint" in completed.stderr or "not a dynconv checkpoint" in completed.stderr


def test_changed_model_on_resume_is_rejected(outcomes, run_train):
    """Resuming a run dir whose checkpoint has 2 experts with op.experts=3 exits 2 naming op.experts and both
    values, and leaves the existing run untouched (checkpoint bytes and config.yaml unchanged)."""
    first, run_dir, _ = outcomes["changed-model-first"]
    assert first.returncode == 0, describe(first)
    last = run_dir / "checkpoints" / "last.pt"
    before = {p: p.read_bytes() for p in [last, run_dir / "config.yaml", run_dir / "metrics.json"]}

    completed, result = run_train(["op=condconv", "op.experts=3", *SMOKE, "recipe.epochs=1",
                                   f"hydra.run.dir={run_dir}"], None, env={"OMP_NUM_THREADS": "1"})
    assert completed.returncode == 2, describe(completed)
    assert "op.experts" in completed.stderr and "2 -> 3" in completed.stderr, describe(completed)
    assert str(last) in completed.stderr
    assert result is None
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} was modified by the rejected run"
    assert OmegaConf.load(run_dir / "config.yaml").op.experts == 2


# ------------------------------------------------------------------------ the same checks, in-process
IN_PROCESS_GROUP_CASES = {
    "op=foo": ["op/foo", "condconv", "static"],
    "data=foo": ["data/foo", "digits", "imagefolder", "imagenet"],
    "recipe=foo": ["recipe/foo", "digits", "imagenet_traditional"],
}


@pytest.mark.parametrize("override", sorted(IN_PROCESS_GROUP_CASES))
def test_unknown_group_option_in_compose(compose_cfg, override):
    """Hydra's compose error for `group=typo` lists the group's available options."""
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_cfg([override])
    for text in IN_PROCESS_GROUP_CASES[override]:
        assert text in str(info.value)


IN_PROCESS_VALUE_CASES = {
    "op.name=foo": (["op.name=foo"], ["op.name='foo'", "condconv", "static", "op=NAME"]),
    "attn.name=foo": (["attn.name=foo"], ["attn.name='foo'", "none"]),
    "task.name=foo": (["task.name=foo"], ["task.name='foo'", "classification"]),
    "data.name=foo": (["data.name=foo"], ["data.name='foo'", "digits, imagefolder, imagenet"]),
    "experts=-1": (["op=condconv", "op.experts=-1"], ["op.experts=-1", "integers >= 1"]),
    "experts=a": (["op=condconv", "op.experts=a"], ["op.experts='a'", "integers >= 1"]),
    "imagefolder-unset-root": (["data=imagefolder"], ["data.root", "data.root="]),
    "imagenet-unset-root": (["data=imagenet", "data.root=null"], ["data.root", "IMAGENET_DIR", "train/", "val/"]),
    "epochs=0": (["recipe.epochs=0"], ["recipe.epochs=0", "integers >= 1"]),
    "batch_size=0": (["recipe.batch_size=0"], ["recipe.batch_size=0", "integers >= 1"]),
    "opt=foo": (["recipe.opt=foo"], ["recipe.opt='foo'", "sgd", "adamw"]),
    "amp=fp8": (["recipe.amp=fp8"], ["recipe.amp='fp8'", "none, bf16, fp16"]),
    "amp=fp16-cpu": (["recipe.amp=fp16", "device=cpu"], ["recipe.amp=fp16", "bf16"]),
    "device=tpu": (["device=tpu"], ["device='tpu'", "auto, cpu, cuda"]),
    "resume-missing": (["resume=/nonexistent/ckpt.pt"], ["/nonexistent/ckpt.pt", "auto", "never"]),
}


@pytest.mark.parametrize("case", sorted(IN_PROCESS_VALUE_CASES))
def test_validate_train_config_messages(compose_cfg, data_dir, monkeypatch, case):
    """validate_train_config (what train.py runs before writing anything) raises ConfigError naming the key,
    the value and the allowed values, for every kind of invalid setting."""
    from dynconv.config import ConfigError, validate_train_config

    monkeypatch.setenv("DYNCONV_DATA_DIR", str(data_dir))
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    overrides, expected = IN_PROCESS_VALUE_CASES[case]
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    for text in expected:
        assert text in str(info.value), f"{text!r} not in {str(info.value)!r}"


def test_validate_train_config_accepts_the_smoke_config(compose_cfg, data_dir, monkeypatch):
    """The counterpart of the cases above: the valid smoke config passes validation unchanged."""
    from dynconv.config import validate_train_config

    monkeypatch.setenv("DYNCONV_DATA_DIR", str(data_dir))
    validate_train_config(compose_cfg([*CONDCONV2, *SMOKE]))
