"""An override that adds a key nothing reads is refused (dynconv/overrides.py): Hydra's hint for a typo
(`recipe.epoch=1` -> "use +recipe.epoch=1") would otherwise train silently with the default.

In-process, inside a running @hydra.main app (single run and multirun), and through scripts/profile.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import CONFIG_DIR, REPO, describe

REFUSED = {
    "+recipe.epoch=1": "recipe.epoch is not a key of this config (did you mean recipe.epochs?)",
    "++recipe.epoch=1": "recipe.epoch is not a key of this config (did you mean recipe.epochs?)",
    "+recipee.epochs=1": "recipee.epochs is not a key of this config (did you mean recipe.epochs?)",
    "+recipe.aug.hflipp=0.5": "(did you mean recipe.aug.hflip?)",
    "+data.imagesize=64": "(did you mean data.image_size?)",
    "+op.expert=8": "(did you mean op.experts?)",
    "+foo=1": "foo is not a key of this config (the keys of the top level are: attn, backbone,",
    "+recipe.ema.foo.bar=1": "recipe.ema.foo.bar is not a key of this config",
}


@pytest.mark.parametrize("override", sorted(REFUSED))
def test_an_added_key_is_refused_with_the_closest_keys(override):
    from dynconv.config import ConfigError
    from dynconv.overrides import SILENT_DEFAULT, reject_added_keys

    with pytest.raises(ConfigError) as info:
        reject_added_keys([override], "train")
    assert REFUSED[override] in str(info.value)
    assert str(info.value).endswith(SILENT_DEFAULT)


GROUP_DEPENDENT = [
    # A detection recipe has `aug: {}`: its classification augmentation keys are read by nobody.
    (["recipe=coco_1x", "+recipe.aug.hflip=0.5"], "recipe.aug.hflip is not a key"),
    # CIFAR's pipeline has no evaluation crop.
    (["data=cifar100", "+data.crop_pct=0.9"], "data.crop_pct is not a key"),
    # The key the `+` builds on is refused, not the later override of it.
    (["+recipe.foo=1", "recipe.foo=2"], "recipe.foo is not a key"),
    # A sweep elsewhere on the command line (-m) does not stop the check.
    (["op.experts=4,8", "+recipe.epoch=1"], "recipe.epoch is not a key"),
]


@pytest.mark.parametrize(("overrides", "expected"), GROUP_DEPENDENT, ids=lambda v: str(v)[:40])
def test_the_check_uses_the_config_the_other_overrides_compose(overrides, expected):
    from dynconv.config import ConfigError
    from dynconv.overrides import reject_added_keys

    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        reject_added_keys(overrides, "train")


@pytest.mark.parametrize("overrides", [
    [], ["recipe.epochs=1", "op=dyconv", "backbone=resnet50"],  # nothing added: no composition at all
    ["++recipe.epochs=3"],  # ++ on an existing key sets it
    ["~recipe.clip_grad", "+recipe.clip_grad=1.0"],  # deleted, then added back: the key exists
    ["+hydra.job.env_set.FOO=1"],  # Hydra's own settings are not ours to check
], ids=str)
def test_overrides_that_add_nothing_unread_pass(overrides):
    from dynconv.overrides import reject_added_keys

    reject_added_keys(overrides, "train")


def test_sections_read_elsewhere_may_take_added_keys():
    """eval.py copies data.* / recipe.* onto the checkpoint's config (checked there by reject_unknown_keys); a
    script may read its own section (bench_overhead.py's +bench.*)."""
    from dynconv.config import ConfigError
    from dynconv.overrides import reject_added_keys

    reject_added_keys(["checkpoint=x.pt", "+data.strict=false", "+recipe.amp=bf16"], "eval")
    with pytest.raises(ConfigError, match="weight is not a key of this config \\(did you mean weights\\?\\)"):
        reject_added_keys(["checkpoint=x.pt", "+weight=ema"], "eval")
    reject_added_keys(["+bench.batch=16"], "train", allow=("bench",))
    with pytest.raises(ConfigError, match="bench.batch is not a key"):
        reject_added_keys(["+bench.batch=16"], "train")


def test_reject_unknown_keys_against_a_stored_config():
    """What eval.py can call with the config stored in a checkpoint and the data/recipe keys it overrides."""
    from dynconv.config import ConfigError
    from dynconv.overrides import reject_unknown_keys

    stored = {"data": {"root": "/d", "strict": False, "max_val_samples": None}, "recipe": {"eval_batch_size": 8}}
    reject_unknown_keys(stored, ["data.strict", "data.max_val_samples", "recipe.eval_batch_size"])
    with pytest.raises(ConfigError, match=r"data\.max_val_sample is not a key of this config \(did you mean "
                                          r"data\.max_val_samples\?\)"):
        reject_unknown_keys(stored, ["data.max_val_sample"])


def test_compose_or_exit_refuses_an_added_key(capsys):
    """The scripts' composition (compose_or_exit) exits 2 naming the key; bench_overhead.py's +bench.* pass."""
    from dynconv.compose import compose_or_exit

    with pytest.raises(SystemExit) as info:
        compose_or_exit("profile", ["+recipe.epoch=1"], validate="none")
    assert info.value.code == 2
    assert "error: recipe.epoch is not a key of this config (did you mean recipe.epochs?)" in capsys.readouterr().err
    assert compose_or_exit("train", ["+bench.batch=16"], validate="none").bench.batch == 16
    with pytest.raises(SystemExit):
        compose_or_exit("train", ["+bench.batch=16"], validate="none", allow_added=())


def test_profile_script_exits_2_naming_the_key():
    completed = subprocess.run([sys.executable, "scripts/profile.py", "+recipe.epoch=1"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, describe(completed)
    assert "error: recipe.epoch is not a key of this config (did you mean recipe.epochs?)" in completed.stderr
    assert "Traceback" not in completed.stderr and completed.stdout.strip() == "", describe(completed)


APP = textwrap.dedent(f"""
    import sys
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from dynconv.config import ConfigError, register_resolvers
    from dynconv.overrides import reject_added_keys

    register_resolvers()


    @hydra.main(version_base="1.3", config_path={str(CONFIG_DIR)!r}, config_name="train")
    def main(cfg):
        try:
            reject_added_keys(HydraConfig.get().overrides.task, "train")
        except ConfigError as error:
            print(f"error: {{error}}", file=sys.stderr)
            sys.exit(2)
        print("ran", cfg.recipe.epochs)


    if __name__ == "__main__":
        main()
""")


@pytest.mark.parametrize(("args", "code", "ran"), [
    (["+recipe.epoch=3"], 2, []),
    (["recipe.epochs=3"], 0, ["ran 3"]),
    # Multirun: every job checks its own overrides; the first job's exit 2 ends the sweep before the second.
    (["-m", "recipe.epochs=1,2", "+recipe.epochz=1"], 2, []),
    (["-m", "+recipe.epoch=1,2"], 2, []),
    (["-m", "recipe.epochs=1,2"], 0, ["ran 1", "ran 2"]),
], ids=str)
def test_inside_a_hydra_app(tmp_path, args, code, ran):
    """In train.py / eval.py the check runs inside @hydra.main: GlobalHydra is initialised there, and the config
    is composed again through it (with the app's config path)."""
    app = tmp_path / "app.py"
    app.write_text(APP)
    completed = subprocess.run([sys.executable, str(app), *args, f"hydra.run.dir={tmp_path / 'run'}",
                                f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=REPO, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == code, describe(completed)
    assert [line for line in completed.stdout.splitlines() if line.startswith("ran")] == ran, describe(completed)
    if code == 2:
        assert "is not a key of this config (did you mean recipe.epochs?)" in completed.stderr, describe(completed)
        assert "Traceback" not in completed.stderr, describe(completed)
