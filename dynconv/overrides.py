"""Refuse command-line overrides that add a key nothing reads.

Why: for a typo such as `recipe.epoch=1` Hydra answers "Key 'epoch' is not in struct ... use +recipe.epoch=1",
and following that hint adds a key that no code reads: the run then trains silently with the default
`recipe.epochs`. Every key the code reads is in the YAML files, so an added key (`+key=value`, or `++key=value`
for a key that does not exist) is refused, naming the closest existing keys. Adding a config group option
(`+experiment=foo`) is fine: it selects a file.

Some configs are merged into another config later, and there an added key may be read: eval.py (and
scripts/kw_attention.py, which extends its config) copy every `data.*` and `recipe.*` key onto the config stored
in the checkpoint, so those keys are checked against the stored config by `reject_unknown_keys`, not here.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from dynconv.config import ConfigError
from dynconv.paths import CONFIG_DIR

# Configs whose added keys below these sections are read elsewhere (see the module docstring).
MERGED_SECTIONS: Mapping[str, tuple[str, ...]] = {"eval": ("data", "recipe"), "kw_attention": ("data", "recipe")}
CUTOFF = 0.6  # difflib's default: below it, a suggestion is noise
SILENT_DEFAULT = "nothing reads an added key, so the run would silently use the default"


def leaf_keys(config: Any, prefix: str = "") -> list[str]:
    """Every leaf key path of a plain container ("recipe.aug.hflip"); an empty section counts as a leaf."""
    if isinstance(config, Mapping) and config:
        return [key for name, value in config.items() for key in leaf_keys(value, f"{prefix}{name}.")]
    return [prefix[:-1]] if prefix else []


def has_key(config: Any, key: str) -> bool:
    """Whether the dotted `key` exists in the plain container `config` (set, null or "???" alike)."""
    node = config
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def unknown_key_message(key: str, config: Mapping[str, Any]) -> str:
    """`key` is not in `config`: the closest existing keys (difflib), else the keys of its section."""
    leaves = leaf_keys(config)
    scores = {leaf: difflib.SequenceMatcher(None, key, leaf).ratio() for leaf in leaves}
    best = max(scores.values(), default=0.0)
    # The best match, and any as close as it (recipe.epoch -> recipe.epochs, not also recipe.warmup_epochs).
    close = sorted((leaf for leaf, score in scores.items() if score >= max(CUTOFF, best - 0.05)),
                   key=lambda leaf: -scores[leaf])[:3]
    if close:
        hint = f"did you mean {' or '.join(close)}?"
    else:
        parent = key.rpartition(".")[0]
        while parent and not has_key(config, parent):
            parent = parent.rpartition(".")[0]
        node = config
        for part in filter(None, parent.split(".")):
            node = node[part]
        names = sorted(node) if isinstance(node, Mapping) else []
        hint = f"the keys of {parent or 'the top level'} are: {', '.join(names) or '(none)'}"
    return f"{key} is not a key of this config ({hint}); {SILENT_DEFAULT}"


def reject_unknown_keys(config: Mapping[str, Any] | DictConfig, keys: Iterable[str]) -> None:
    """ConfigError for the first of `keys` that `config` lacks (eval.py: the overrides it copies onto the config
    stored in a checkpoint must name keys that config has)."""
    plain = OmegaConf.to_container(config, resolve=False) if isinstance(config, DictConfig) else config
    for key in keys:
        if not has_key(plain, key):
            raise ConfigError(unknown_key_message(key, plain))


def _is_group(name: str) -> bool:
    """A config group (a folder of configs/, or one of Hydra's own under hydra/) rather than a key."""
    return name.startswith("hydra/") or (CONFIG_DIR / name).is_dir()


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose `config_name` in the running Hydra app if there is one (train.py, eval.py: inside @hydra.main,
    GlobalHydra is initialised with their config path), else from configs/ (scripts, tests)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name=config_name, overrides=overrides)


def reject_added_keys(overrides: Sequence[str], config_name: str, *, allow: Sequence[str] = ()) -> None:
    """Raise ConfigError when an override adds a key nothing reads (see the module docstring).

    `overrides`: the command line's overrides (train.py / eval.py: `HydraConfig.get().overrides.task`, each job
    of a multirun its own); `config_name`: the config they apply to ("train", "eval", ...); `allow`: sections
    whose added keys a caller reads itself (and `MERGED_SECTIONS[config_name]`). The config is composed again,
    without the adding overrides, only when there is one, and keys are looked up in it.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    sections = tuple(allow) + tuple(MERGED_SECTIONS.get(config_name, ()))
    added = [o for o in parsed if (o.is_add() or o.is_force_add()) and not _is_group(o.key_or_group)
             and not o.key_or_group.startswith("hydra.")
             and not any(o.key_or_group == s or o.key_or_group.startswith(f"{s}.") for s in sections)]
    if not added:
        return
    added_ids = {id(o) for o in added}
    added_keys = {o.key_or_group for o in added}

    def builds_on_added(override) -> bool:  # `+recipe.foo=1 recipe.foo=2`, `~recipe.foo +recipe.foo=1`
        key = override.key_or_group
        return any(key == a or key.startswith(f"{a}.") for a in added_keys)

    def concrete(override) -> str:  # a sweep (multirun, `op.experts=4,8`) composes with its first value
        if not override.is_sweep_override():
            return override.input_line
        return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"

    base = [concrete(o) for o in parsed if id(o) not in added_ids and not builds_on_added(o)]
    config = OmegaConf.to_container(_compose(config_name, base), resolve=False)
    for override in added:
        if not has_key(config, override.key_or_group):  # `+key` on an existing key: Hydra's own error says so
            raise ConfigError(unknown_key_message(override.key_or_group, config))
