"""Config composition: every option of every group composes, every key is documented, experiments apply."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

GROUPS = ("backbone", "op", "attn", "task", "data", "recipe", "experiment")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


GROUP_OPTIONS = [(group, option) for group in GROUPS for option in _options(group)]
ALL_YAML = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_every_group_has_options():
    """Guards the enumeration below: an empty or renamed group dir would silently make the compose test vacuous."""
    for group in GROUPS:
        assert _options(group), f"configs/{group}/ has no options"
    assert "resnet18" in _options("backbone") and {"static", "condconv"} <= set(_options("op"))


def _leaves(mapping, prefix=()):
    """(path, value) for every leaf of a parsed YAML mapping, skipping interpolations."""
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        elif not (isinstance(value, str) and "${" in value):
            yield (*prefix, key), value


def _select(container, path):
    for key in path:
        container = container[key]
    return container


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(compose_cfg, group, option):
    """`group=option` composes on top of train.yaml and every value the chosen file sets lands in the config
    (nested keys included); an experiment's `override /group: option` entries select those options.

    Composition errors (bad defaults lists, wrong `# @package`, interpolation typos) would otherwise only
    show up when someone launches that combination.
    """
    cfg = compose_cfg([f"{group}={option}"])
    assert OmegaConf.select(cfg, "hydra") is None  # plain compose: job config only
    # Resolve everything except mandatory-missing values (data=imagefolder has root: ???).
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    text = (CONFIG_DIR / group / f"{option}.yaml").read_text()
    own = yaml.safe_load(text) or {}
    # Experiments (and data=toy_coco, which also picks its recipe and detector size) are `# @package _global_`.
    prefix = () if "# @package _global_" in text else (group,)
    for path, value in _leaves({k: v for k, v in own.items() if k != "defaults"}, prefix):
        if value == "???":
            assert OmegaConf.is_missing(OmegaConf.select(cfg, ".".join(path[:-1])), path[-1])
        else:
            assert _select(container, path) == value, ".".join(path)
    for entry in own.get("defaults", []):
        if isinstance(entry, dict):
            ((key, chosen),) = entry.items()
            if key.startswith("override /"):
                chosen_group = key.removeprefix("override /")
                chosen_own = yaml.safe_load((CONFIG_DIR / chosen_group / f"{chosen}.yaml").read_text())
                if "name" in chosen_own:
                    assert container[chosen_group]["name"] == chosen_own["name"], f"{key}: {chosen}"


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (CONFIG_DIR / "hydra" / "launcher").glob("*.yaml")))
def test_hydra_launcher_options_compose(compose_cfg, launcher):
    """`hydra/launcher=<option>` composes with the Hydra config and our values override the plugin defaults."""
    own = yaml.safe_load((CONFIG_DIR / "hydra" / "launcher" / f"{launcher}.yaml").read_text())
    cfg = compose_cfg([f"hydra/launcher={launcher}"], return_hydra_config=True)
    chosen = cfg.hydra.launcher
    assert "_target_" in chosen, "the launcher plugin's schema was not merged in"
    for key, value in own.items():
        if key != "defaults":
            assert OmegaConf.to_container(chosen)[key] == value, f"hydra.launcher.{key}"


def test_experiment_resnet18_condconv_imagenet(compose_cfg):
    """The experiment file overrides groups and keys: 8 experts (the papers' 8x) on ImageNet with ResNet18."""
    cfg = compose_cfg(["experiment=resnet18_condconv_imagenet"])
    assert cfg.op.name == "condconv"
    assert cfg.op.experts == 8
    assert cfg.data.name == "imagenet"
    assert cfg.backbone.name == "resnet18"
    assert cfg.recipe.epochs == 100 and cfg.recipe.sched == "step"
    # The default composition differs, so the experiment really changed something.
    default = compose_cfg([])
    assert (default.op.experts, default.data.name) != (8, "imagenet")


def test_command_line_overrides_win_over_experiment(compose_cfg):
    """A key given on the command line beats the experiment's value (experiment is a default, not a lock)."""
    cfg = compose_cfg(["experiment=resnet18_condconv_imagenet", "op.experts=2"])
    assert cfg.op.experts == 2


BACKBONE_OPTIONS = _options("backbone")


@pytest.mark.parametrize("op", ["static", "condconv"])
@pytest.mark.parametrize("backbone", BACKBONE_OPTIONS)
def test_validate_model_config_accepts_every_backbone_and_op(compose_cfg, backbone, op):
    """Every backbone config file names a registered backbone, and validation accepts it with both operators (a
    video backbone under task=video, the only task it fits)."""
    from dynconv.backbones.video import VIDEO_BACKBONES
    from dynconv.config import validate_model_config

    task = ["task=video"] if backbone in VIDEO_BACKBONES else []
    # backbone=timm needs the network's name: timm's smallest test model (placement and features: test_convert_any)
    model = ["backbone.model=test_efficientnet"] if backbone == "timm" else []
    cfg = compose_cfg([f"backbone={backbone}", f"op={op}", *task, *model])
    validate_model_config(cfg)


def test_validate_model_config_rejects_unknown_backbone(compose_cfg):
    """Counterpart of the test above: validation does reject a wrong name (so acceptance means something)."""
    from dynconv.config import ConfigError, validate_model_config

    cfg = compose_cfg(["backbone.name=resnet19"])
    with pytest.raises(ConfigError, match="resnet18"):
        validate_model_config(cfg)


# ------------------------------------------------------------------------------------------ documentation
_KEY_LINE = re.compile(r"^\s*(?:-\s+)?[A-Za-z_][\w./@ -]*:(?:\s|$)")


def _code_part(line: str) -> str:
    """The line without its trailing ` # comment`."""
    return line.split(" # ", 1)[0].rstrip()


def _classify(path: Path):
    """Yield (lineno, line, kind) for every non-comment line: kind is leaf, section, defaults_entry."""
    in_defaults = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            in_defaults = stripped.startswith("defaults:")
        if stripped.startswith("- ") and in_defaults:
            yield number, line, "defaults_entry"
        elif _KEY_LINE.match(line):
            value = _code_part(line).split(":", 1)[1].strip()
            yield number, line, ("leaf" if value else "section")
        else:
            yield number, line, "other"


def _undocumented(kinds: set[str], exempt=lambda line: False) -> list[str]:
    missing = []
    for path in ALL_YAML:
        for number, line, kind in _classify(path):
            if kind in kinds and " # " not in line and not exempt(line):
                missing.append(f"{path.relative_to(CONFIG_DIR)}:{number}: {line.strip()}")
    return missing


def test_every_leaf_key_has_an_inline_comment():
    """Each `key: value` line in every YAML under configs/ carries a one-line ` # ` comment.

    The comment is the only documentation of a knob; `# @package` headers and comment-only lines are exempt.
    """
    assert ALL_YAML
    missing = _undocumented({"leaf", "other"})
    assert not missing, "undocumented keys:\n" + "\n".join(missing)


def test_classifier_detects_an_undocumented_key(tmp_path):
    """The checker itself must flag a leaf key without a comment (otherwise the test above proves nothing)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("# @package _global_\ndefaults:\n  - x  # fine\nfoo: 1\nbar: 2  # ok\nsection:\n  baz: 3  # ok\n")
    kinds = {n: k for n, _, k in _classify(bad)}
    assert kinds == {2: "section", 3: "defaults_entry", 4: "leaf", 5: "leaf", 6: "section", 7: "leaf"}
    flagged = [n for n, line, k in _classify(bad) if k == "leaf" and " # " not in line]
    assert flagged == [4]


def test_every_defaults_entry_has_an_inline_comment():
    """Each entry of a `defaults:` list (except the `- _self_` marker) says in a comment what it selects."""
    missing = _undocumented({"defaults_entry"}, exempt=lambda line: line.strip() == "- _self_")
    assert not missing, "undocumented defaults entries:\n" + "\n".join(missing)


def test_every_section_key_has_an_inline_comment():
    """Mapping headers (`key:` with nested keys below) are keys too and carry a one-line comment."""
    missing = _undocumented({"section"})
    assert not missing, "undocumented section keys:\n" + "\n".join(missing)
