"""Every key of a composed train config has a value rule (dynconv/config_checks.py), the shipped configs pass
them, and each rule refuses a wrong value with a message naming the key, the value and what is allowed.

The single-key cases apply the rules to a plain copy of a composed config (no model build: fast); the cases
that need the whole validation (a meta-device forward pass, a dataset size, the machine) go through
`validate_train_config`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dynconv.config import ConfigError
from dynconv.config_checks import BACKBONE_SECTION, DATA_SECTION, OP_SECTION, RUN_SECTIONS, check_section
from dynconv.knobs import Knobs

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SECTIONS = {section.path: section for section in (*RUN_SECTIONS, DATA_SECTION, BACKBONE_SECTION, OP_SECTION)}
# Sections whose keys their owners check: the operator's, the add-on's and the task's knobs (op.keep_static,
# which every operator takes, also has a rule here).
OWNED_ELSEWHERE = {"op", "attn", "task"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


COMPOSITIONS = [[]] + [[f"{group}={option}"] for group in ("recipe", "data", "backbone", "experiment")
                       for option in _options(group)]


def _plain(compose_cfg, overrides) -> dict:
    return OmegaConf.to_container(compose_cfg(overrides), resolve=True, throw_on_missing=False)


def _check_all(plain: dict) -> None:
    for section in SECTIONS.values():
        check_section(plain, section, ConfigError)


@pytest.mark.parametrize("overrides", COMPOSITIONS, ids=lambda o: " ".join(o) or "defaults")
def test_every_key_has_a_rule_and_the_shipped_values_pass(compose_cfg, overrides):
    """A key without a rule would be unchecked (a new YAML key must come with one in config_checks.py), and
    every shipped option is valid as it stands."""
    plain = _plain(compose_cfg, overrides)
    nested = {path for path in SECTIONS if path and path not in OWNED_ELSEWHERE}
    top_sections = {path.split(".")[0] for path in nested}
    unknown = sorted(set(plain) - set(SECTIONS[""].rules) - top_sections - OWNED_ELSEWHERE)
    assert not unknown, f"top-level keys without a rule: {unknown}"
    for path in sorted(nested):
        node = plain
        for part in path.split("."):
            node = node.get(part) or {}
        keys = {key for key, value in node.items() if f"{path}.{key}" not in nested}
        missing = sorted(keys - set(SECTIONS[path].rules))
        assert not missing, f"{path}: keys without a rule: {missing}"
    if plain["data"].get("root") == "???":
        plain["data"]["root"] = "/some/dir"  # imagefolder's mandatory root: the layout check names it
    _check_all(plain)


# (key, value, what the message must contain after "<key>=<value!r> is invalid; allowed values: ")
REJECTED = [
    ("seed", -1, "integers in [0, 4294967295]"),
    ("seed", 2**40, "integers in [0, 4294967295]"),
    ("seed", 1.5, "integers in"),
    ("device", "tpu", "auto, cpu, cuda"),
    ("init_from", 5, "null, a path to an existing checkpoint file"),
    ("resume", "", "auto, never, a path to an existing checkpoint file"),
    ("deterministic", "yes", "true, false"),
    ("conv_algorithm", "fastest", "measure, model"),
    ("kernel_memory", "lean", "auto, keep, recompute"),
    ("dist.backend", "mpi", "auto, nccl, gloo"),
    ("dist.timeout_s", 0, "a number in (0.0, 1000000000.0]"),
    ("dist.timeout_s", 1e30, "a number in (0.0, 1000000000.0]"),
    ("nonfinite.max_consecutive", 0, "integers >= 1"),
    ("log.every", 0, "integers >= 1"),
    ("log.progress_bar", 1, "true, false"),
    ("log.tensorboard", "false", "true, false"),
    ("checkpoint.enabled", None, "true, false"),
    ("checkpoint.save_best", 0, "true, false"),
    ("checkpoint.keep_last", 3, "1, 2"),
    ("checkpoint.keep_last", True, "1, 2"),
    ("checkpoint.keep_last", 1.0, "1, 2"),
    ("checkpoint.on_write_error", "ignore", "stop, continue"),
    ("recipe.epochs", 0, "integers >= 1"),
    ("recipe.batch_size", "64", "integers >= 1"),
    ("recipe.eval_batch_size", 0, "integers >= 1"),
    ("recipe.drop_last", "true", "true, false"),
    ("recipe.opt", "sgdd", "sgd"),
    ("recipe.lr", 0, "finite numbers > 0"),
    ("recipe.lr", float("inf"), "finite numbers > 0"),
    ("recipe.lr", float("nan"), "finite numbers > 0"),
    ("recipe.momentum", 1.0, "a number in [0.0, 1.0)"),
    ("recipe.momentum", -0.1, "a number in [0.0, 1.0)"),
    ("recipe.weight_decay", -1e-4, "finite numbers >= 0"),
    ("recipe.sched", "exponential", "cosine, step, multistep, linear, poly, none"),
    ("recipe.warmup_epochs", -1, "finite numbers >= 0"),
    ("recipe.warmup_lr", -0.1, "finite numbers >= 0"),
    ("recipe.min_lr", "0", "finite numbers >= 0"),
    ("recipe.decay_epochs", 0, "finite numbers > 0"),
    ("recipe.decay_milestones", [60, 30], "a list of numbers >= 0 in ascending order"),
    ("recipe.decay_milestones", [-1, 30], "a list of numbers >= 0 in ascending order"),
    ("recipe.decay_milestones", 30, "a list of numbers >= 0 in ascending order"),
    ("recipe.decay_rate", 0, "a number in (0.0, 1.0]"),
    ("recipe.decay_rate", 10, "a number in (0.0, 1.0]"),
    ("recipe.smoothing", 1.0, "a number in [0.0, 1.0)"),
    ("recipe.clip_grad", 0, "null or finite numbers > 0"),
    ("recipe.amp", "fp8", "none, bf16, fp16"),
    ("recipe.channels_last", "no", "true, false"),
    ("recipe.compile", 1, "true, false"),
    ("recipe.sync_bn", None, "true, false"),
    ("recipe.eval_every", 0, "integers >= 1"),
    ("recipe.ema.enabled", "on", "true, false"),
    ("recipe.ema.decay", 1.0, "a number in [0.0, 1.0)"),
    ("recipe.ema.warmup", 2, "true, false"),
    ("recipe.aug.scale", [0.9, 0.1], "a pair [a, b] with 0 < a <= b <= 1"),
    ("recipe.aug.scale", [0.0, 1.0], "a pair [a, b] with 0 < a <= b <= 1"),
    ("recipe.aug.scale", [0.5, 1.5], "a pair [a, b] with 0 < a <= b <= 1"),
    ("recipe.aug.scale", [0.5], "a pair [a, b] with 0 < a <= b <= 1"),
    ("recipe.aug.ratio", [1.3, 0.75], "a pair [a, b] with 0 < a <= b"),
    ("recipe.aug.ratio", [-1, 1], "a pair [a, b] with 0 < a <= b"),
    ("recipe.aug.hflip", 1.5, "a number in [0.0, 1.0]"),
    ("recipe.aug.vflip", -0.5, "a number in [0.0, 1.0]"),
    ("recipe.aug.color_jitter", -0.4, "null, a number >= 0, or a list of 3 or 4 numbers >= 0"),
    ("recipe.aug.color_jitter", [0.4, 0.4], "a list of 3 or 4 numbers"),
    ("recipe.aug.color_jitter", [0.4, 0.4, 0.4, 0.6], "hue <= 0.5"),
    ("recipe.aug.color_jitter", "strong", "null, a number >= 0"),
    ("recipe.aug.auto_augment", 9, "a timm auto-augment policy"),
    ("recipe.aug.re_prob", 2, "a number in [0.0, 1.0]"),
    ("recipe.aug.re_mode", "zeros", "pixel, rand, const"),
    ("recipe.aug.re_count", 0, "integers >= 1"),
    ("recipe.aug.mixup", -0.8, "finite numbers >= 0"),
    ("recipe.aug.cutmix", "1", "finite numbers >= 0"),
    ("recipe.aug.mixup_prob", 1.1, "a number in [0.0, 1.0]"),
    ("recipe.aug.mixup_switch_prob", -1, "a number in [0.0, 1.0]"),
    ("data.root", 3, "a directory (a non-empty string)"),
    ("data.root", "", "a directory (a non-empty string)"),
    ("data.image_size", 0, "integers in [1, 8192]"),
    ("data.image_size", 22400, "integers in [1, 8192]"),
    ("data.image_size", 32.0, "integers in [1, 8192]"),
    ("data.num_classes", 5, "null, 10 (data=digits has 10 classes)"),
    ("data.strict", "false", "true, false"),
    ("data.num_workers", -1, "auto, integers >= 0"),
    ("data.num_workers", "many", "auto, integers >= 0"),
    ("data.num_workers", 2.5, "auto, integers >= 0"),
    ("data.pin_memory", 1, "true, false"),
    ("data.persistent_workers", None, "true, false"),
    ("data.mean", [0.5, 0.5], "a list of 3 numbers"),
    ("data.mean", ["a", "b", "c"], "a list of 3 numbers"),
    ("data.std", [0.5, 0.0, 0.5], "a list of 3 numbers > 0"),
    ("data.crop_pct", 0, "a number in (0.0, 1.0]"),
    ("data.crop_pct", 1.2, "a number in (0.0, 1.0]"),
    ("data.interpolation", "random", "nearest, bilinear, bicubic, box, hamming, lanczos"),
    ("data.max_train_samples", 0, "integers >= 1 or null"),
    ("data.max_val_samples", -5, "integers >= 1 or null"),
    ("backbone.drop_rate", 1.0, "null or a number in [0.0, 1.0)"),
    ("backbone.drop_path_rate", -0.1, "null or a number in [0.0, 1.0)"),
    ("backbone.default_resolution", 0, "integers in [1, 8192]"),
    ("op.keep_static", "layer1.*", "null or a list of non-empty strings"),
    ("op.keep_static", [3], "null or a list of non-empty strings"),
]
# Keys of data configs other than the default digits: (option, key, value, expected).
REJECTED_IN = [
    ("imagenet", "data.num_classes", 1, "integers >= 2 or null"),
    ("cifar100", "data.num_classes", 10, "null, 100 (data=cifar100 has 100 classes)"),
    ("cifar100", "data.crop_padding", -4, "integers >= 0"),
    ("toy_coco", "data.train_sizes", [], "a non-empty list of integers >= 32 and <= 8192"),
    ("toy_coco", "data.train_sizes", [16, 128], "a non-empty list of integers >= 32 and <= 8192"),
    ("toy_coco", "data.train_sizes", [128.5], "a non-empty list of integers >= 32 and <= 8192"),
    ("toy_coco", "data.test_size", 16, "integers in [32, 8192]"),
    ("toy_coco", "data.max_size", 100, "integers in [144, 8192]"),
    ("coco", "data.max_size", 700, "integers in [800, 8192]"),
    ("toy_coco", "data.hflip", 2, "a number in [0.0, 1.0]"),
    ("toy_coco", "data.train_split", "", "a non-empty string"),
    ("coco", "data.val_split", 2017, "a non-empty string"),
]
ACCEPTED = [
    ("seed", 0), ("seed", 2**32 - 1), ("init_from", None), ("resume", "never"), ("conv_algorithm", None),
    ("conv_algorithm", "model"), ("kernel_memory", "recompute"), ("dist.timeout_s", 0.5), ("checkpoint.keep_last", 1),
    ("recipe.momentum", 0.0), ("recipe.warmup_epochs", 0.07), ("recipe.decay_milestones", []),
    ("recipe.decay_rate", 1.0), ("recipe.smoothing", 0.0), ("recipe.clip_grad", None), ("recipe.clip_grad", 1),
    ("recipe.ema.decay", 0.0), ("recipe.aug.scale", [1.0, 1.0]), ("recipe.aug.ratio", [3.0, 5.0]),
    ("recipe.aug.hflip", 1), ("recipe.aug.color_jitter", 0), ("recipe.aug.color_jitter", [0.4, 0.4, 0.4, 0.1]),
    ("recipe.aug.auto_augment", "none"), ("recipe.aug.auto_augment", "augmix-m5-w4-d2"),
    ("recipe.aug.auto_augment", "original"), ("data.num_classes", None), ("data.num_workers", "auto"),
    ("data.num_workers", 0), ("data.mean", [0, -1.5, 2]), ("data.crop_pct", 1), ("data.interpolation", "bicubic"),
    ("data.max_train_samples", None), ("backbone.drop_rate", None), ("op.keep_static", None),
    ("op.keep_static", ["layer1.*"]),
]


def _set(plain: dict, key: str, value) -> dict:
    changed = copy.deepcopy(plain)
    *parents, leaf = key.split(".")
    node = changed
    for part in parents:
        node = node[part]
    node[leaf] = value
    return changed


@pytest.fixture(scope="module")
def composed():
    """Plain copies of composed configs, by data option (one Hydra composition each)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dynconv.config import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        configs = {option: OmegaConf.to_container(compose("train", overrides=[f"data={option}"]), resolve=True,
                                                  throw_on_missing=False)
                   for option in ("digits", "imagenet", "cifar100", "toy_coco", "coco")}
    GlobalHydra.instance().clear()
    return configs


@pytest.mark.parametrize(("option", "key", "value", "allowed"),
                         [("digits", *case) for case in REJECTED] + REJECTED_IN,
                         ids=lambda v: repr(v)[:40])
def test_a_wrong_value_is_refused_naming_key_value_and_allowed(composed, option, key, value, allowed):
    with pytest.raises(ConfigError) as info:
        _check_all(_set(composed[option], key, value))
    message = str(info.value)
    assert message.startswith(f"{key}={value!r}"), message
    assert allowed in message, message


@pytest.mark.parametrize(("key", "value"), ACCEPTED, ids=lambda v: repr(v)[:40])
def test_a_boundary_value_is_accepted(composed, key, value):
    _check_all(_set(composed["digits"], key, value))


def test_a_missing_checkpoint_file_is_named(composed, tmp_path):
    for key in ("init_from", "resume"):
        with pytest.raises(ConfigError, match=f"{key}='{tmp_path}/nope.pt': no such checkpoint file"):
            _check_all(_set(composed["digits"], key, str(tmp_path / "nope.pt")))
        existing = tmp_path / "last.pt"
        existing.write_bytes(b"")
        _check_all(_set(composed["digits"], key, str(existing)))  # its content is read (and named) later


def test_a_required_key_or_section_that_is_not_there(composed):
    """A deleted key (`~recipe.epochs`) or a section replaced by a scalar is named; keys a group does not
    define are not required (a detection recipe has no aug keys, CIFAR's data no crop_pct)."""
    plain = copy.deepcopy(composed["digits"])
    del plain["recipe"]["epochs"]
    with pytest.raises(ConfigError, match=r"recipe\.epochs is required but not set: pass recipe\.epochs=\.\.\."):
        _check_all(plain)
    with pytest.raises(ConfigError, match=r"recipe\.ema=5 is invalid; allowed values: a section with the keys"):
        _check_all(_set(composed["digits"], "recipe.ema", 5))
    _check_all(_set(composed["digits"], "recipe.aug", {}))
    _check_all(composed["toy_coco"])
    _check_all(composed["cifar100"])


# --------------------------------------------------------------------- through validate_train_config
WHOLE = {
    "deit-size": (["backbone=deit_tiny", "data.image_size=40"],
                  ["data.image_size=40 does not fit backbone=deit_tiny", "divisible by patch size (16)"]),
    "convnext-size": (["backbone=convnext_tiny", "data.image_size=16"],
                      ["data.image_size=16 does not fit backbone=convnext_tiny", "allowed values"]),
    "vgg-size": (["backbone=vgg19_cifar", "op=static", "data.image_size=24"],
                 ["data.image_size=24 does not fit backbone=vgg19_cifar"]),
    "subset-below-batch": (["data.max_train_samples=10"],
                           ["recipe.batch_size=64", "data.max_train_samples=10", "recipe.drop_last=false"]),
    "batch-above-digits": (["recipe.batch_size=5000"], ["recipe.batch_size=5000", "1437 training images"]),
    "interpolation": (["recipe.lr=${oops}"], ["recipe.lr='${oops}' cannot be resolved", "not found"]),
    "env-interpolation": (["recipe.lr=${oc.env:DYNCONV_TEST_UNSET_VARIABLE}"],
                          ["recipe.lr='${oc.env:DYNCONV_TEST_UNSET_VARIABLE}' cannot be resolved", "not found"]),
    "transform-built-once": (["recipe.aug.auto_augment=rand-n-1"],
                             ["recipe.aug.auto_augment='rand-n-1'", "timm cannot build it"]),
    "task-backbone-pair": (["task=maskrcnn", "data=toy_coco", "backbone=resnext29_16x64d"],
                           ["task=maskrcnn does not fit backbone=resnext29_16x64d", "C3"]),
    "image-size-type-before-build": (["data.image_size=abc"], ["data.image_size='abc' is invalid"]),
    "keep-static-before-build": (["op.keep_static=7"], ["op.keep_static=7 is invalid"]),
}


@pytest.mark.parametrize("case", sorted(WHOLE))
def test_validate_train_config_cross_checks(compose_cfg, tmp_path, monkeypatch, case):
    """(An empty DYNCONV_DATA_DIR: digits are written at data.image_size on first use, and a tree of another
    size is refused by the dataset's own check.)"""
    from dynconv.config import validate_train_config

    monkeypatch.setenv("DYNCONV_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    overrides, expected = WHOLE[case]
    with pytest.raises(ConfigError) as info:
        validate_train_config(compose_cfg(overrides))
    for text in expected:
        assert text in str(info.value), str(info.value)


@pytest.mark.parametrize("overrides", [["backbone=deit_tiny", "data.image_size=48"],
                                       ["backbone=resnet18", "op=static", "data.image_size=8"],
                                       ["data.max_train_samples=64"], ["recipe.drop_last=false", "data.max_train_samples=3"],
                                       ["task=retinanet", "data=toy_coco"]])
def test_validate_train_config_accepts(compose_cfg, tmp_path, monkeypatch, overrides):
    from dynconv.config import validate_train_config

    monkeypatch.setenv("DYNCONV_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    validate_train_config(compose_cfg(overrides))


def test_machine_dependent_settings(compose_cfg, monkeypatch):
    """Settings that need CUDA are refused on a CPU-only machine (and with several processes)."""
    import torch

    from dynconv.config import validate_recipe_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cases = {"dist.backend=nccl": "dist.backend=nccl needs CUDA", "recipe.sync_bn=true": "recipe.sync_bn=true",
             "recipe.amp=fp16": "recipe.amp=fp16 needs a CUDA device", "device=cuda": "device=cuda"}
    for override, expected in cases.items():
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
            validate_recipe_config(compose_cfg([override]))
    monkeypatch.setenv("WORLD_SIZE", "1")
    validate_recipe_config(compose_cfg(["dist.backend=nccl", "recipe.sync_bn=true"]))  # one process: unused


def test_data_rules_apply_to_an_evaluated_checkpoints_config(compose_cfg, data_dir, monkeypatch):
    """eval.py validates the stored config with its overrides merged in (validate_data_config)."""
    from dynconv.config import validate_data_config

    monkeypatch.setenv("DYNCONV_DATA_DIR", str(data_dir))
    stored = compose_cfg([])
    validate_data_config(stored)
    OmegaConf.update(stored, "data.num_workers", -2)
    with pytest.raises(ConfigError, match=r"data\.num_workers=-2 is invalid; allowed values: auto, integers >= 0"):
        validate_data_config(stored)


EVAL_CASES = {
    "checkpoint-unset": ([], "checkpoint is required but not set"),
    "weights": (["checkpoint=x.pt", "weights=best"], "weights='best' is invalid; allowed values: model, ema"),
    "device": (["checkpoint=x.pt", "device=gpu"], "device='gpu' is invalid"),
    "workers": (["checkpoint=x.pt", "data.num_workers=-1"], "data.num_workers=-1 is invalid"),
    "subset": (["checkpoint=x.pt", "data.max_val_samples=0"], "data.max_val_samples=0 is invalid"),
    "batch": (["checkpoint=x.pt", "recipe.eval_batch_size=0"], "recipe.eval_batch_size=0 is invalid"),
    "root": (["checkpoint=x.pt", "data.root=''"], "data.root='' is invalid"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_validate_eval_config(compose_cfg, case):
    from dynconv.config import validate_eval_config

    overrides, expected = EVAL_CASES[case]
    with pytest.raises(ConfigError) as info:
        validate_eval_config(compose_cfg(overrides, config_name="eval"))
    assert expected in str(info.value), str(info.value)


def test_validate_eval_config_accepts_its_defaults_and_overrides(compose_cfg):
    from dynconv.config import validate_eval_config

    validate_eval_config(compose_cfg(["checkpoint=x.pt"], config_name="eval"))
    validate_eval_config(compose_cfg(["checkpoint=x.pt", "weights=ema", "data.num_workers=auto",
                                      "data.max_val_samples=10", "recipe.eval_batch_size=8", "data.root=/d"],
                                     config_name="eval"))


# ------------------------------------------------------------------------------------- Knobs additions
def _knobs(**values) -> Knobs:
    return Knobs(values, "s", error=ConfigError)


def test_knobs_choice_is_strict_about_types():
    knobs = _knobs(a=True, b=1.0, c=2)
    for key in ("a", "b"):
        with pytest.raises(ConfigError, match="allowed values: 1, 2"):
            knobs.choice(key, (1, 2))
    assert knobs.choice("c", (1, 2)) == 2


def test_knobs_lists_pairs_and_words():
    knobs = _knobs(ascending=[1, 2, 3], flat=[1, 1], ints=[32, 64], floats=[32.5], pair=[0.2, 0.8], words="auto",
                   count=3, negative=-1, patterns=["a.*"], bare="a.*", empty=[])
    assert knobs.numbers("ascending", ascending=True) == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="in ascending order"):
        knobs.numbers("flat", ascending=True)
    assert knobs.numbers("ints", integers=True, low=32) == [32, 64]
    with pytest.raises(ConfigError, match="list of integers"):
        knobs.numbers("floats", integers=True)
    assert knobs.numbers("empty", empty=True) == []
    with pytest.raises(ConfigError, match="non-empty list"):
        knobs.numbers("empty")
    assert knobs.pair("pair", 0.0, 1.0) == (0.2, 0.8)
    assert knobs.integer_or("words", ("auto",)) == "auto" and knobs.integer_or("count", ("auto",)) == 3
    with pytest.raises(ConfigError, match="auto, integers >= 0"):
        knobs.integer_or("negative", ("auto",))
    assert knobs.strings("patterns") == ["a.*"] and knobs.strings("empty") == []
    with pytest.raises(ConfigError, match="a list of non-empty strings"):
        knobs.strings("bare")
    assert knobs.integer("count", 1, high=3) == 3
    with pytest.raises(ConfigError, match=r"integers in \[1, 2\]"):
        knobs.integer("count", 1, high=2)
    assert knobs.number("missing", 0.0, nullable=True) is None
    with pytest.raises(ConfigError, match=r"a number in \[0.0, 1.0\)"):
        _knobs(x=1.0).number_in("x", 0.0, 1.0, high_open=True)
