"""Config composition for the scripts that are not Hydra jobs (profile, bench): same groups, same errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from dynconv.config import ConfigError, register_resolvers, validate_model_config, validate_recipe_config
from dynconv.paths import CONFIG_DIR

# Sections that a script adds to a config without them and reads itself: scripts/bench_overhead.py composes
# train.yaml with its own `+bench.*` keys. Every other added key is refused (dynconv/overrides.py).
SCRIPT_SECTIONS: dict[str, tuple[str, ...]] = {"train": ("bench",)}


def drop_scripts_dir_from_path(script: str) -> None:
    """Call first in scripts/*.py: `scripts/profile.py` shares its name with the standard library's
    `profile`, which torch imports (through cProfile); with the scripts folder on sys.path that import
    would find the script instead. Must run before torch is imported."""
    scripts_dir = Path(script).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != scripts_dir]


def compose_or_exit(config_name: str, overrides: list[str], validate: str = "model",
                    allow_added: Sequence[str] | None = None) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with command-line overrides; on a bad config print why and exit 2.

    An override that adds a key nothing reads (`+recipe.epoch=1`) is refused too; `allow_added`: the sections
    whose added keys the calling script reads itself (default: `SCRIPT_SECTIONS[config_name]`)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dynconv.overrides import reject_added_keys

    register_resolvers()
    allow = SCRIPT_SECTIONS.get(config_name, ()) if allow_added is None else tuple(allow_added)
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose(config_name=config_name, overrides=list(overrides))
            reject_added_keys(overrides, config_name, allow=allow)
        if validate in ("model", "all"):
            validate_model_config(cfg)
        if validate == "all":
            validate_recipe_config(cfg)
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return cfg
