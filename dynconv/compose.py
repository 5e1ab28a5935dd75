"""Config composition for the scripts that are not Hydra jobs (profile, bench): same groups, same errors."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from dynconv.config import ConfigError, register_resolvers, validate_model_config, validate_recipe_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def drop_scripts_dir_from_path(script: str) -> None:
    """Call first in scripts/*.py: `scripts/profile.py` shares its name with the standard library's
    `profile`, which torch imports (through cProfile); with the scripts folder on sys.path that import
    would find the script instead. Must run before torch is imported."""
    scripts_dir = Path(script).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != scripts_dir]


def compose_or_exit(config_name: str, overrides: list[str], validate: str = "model") -> DictConfig:
    """Compose `configs/<config_name>.yaml` with command-line overrides; on a bad config print why and exit 2."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        if validate in ("model", "all"):
            validate_model_config(cfg)
        if validate == "all":
            validate_recipe_config(cfg)
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return cfg
