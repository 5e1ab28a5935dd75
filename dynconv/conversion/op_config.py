"""An operator's config from its YAML file and keyword knobs, validated as a composed config is.

`configs/op/<name>.yaml` is the one source of an operator's defaults; `dynconv.convert(model, op=..., **knobs)`
reads it here instead of composing a whole training config (which would need a backbone). A knob the file does
not have, or a value the operator refuses, is a ConfigError naming the key and what is allowed, the same message
`python train.py op=<name> op.<knob>=...` gives.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def op_names() -> list[str]:
    """The operators configs/op/ offers (`op=` names)."""
    from dynconv.compose import CONFIG_DIR

    return sorted(path.stem for path in (CONFIG_DIR / "op").glob("*.yaml"))


def op_config(op: str, **knobs: Any) -> dict[str, Any]:
    """configs/op/<op>.yaml with `knobs` set, its interpolations resolved outside any recipe (kw's `tau_epochs`
    takes its default, the papers' 10), checked by the operator's own validation. A plain dict, what
    `dynconv.build.make_operator` takes."""
    from dynconv.build import make_operator
    from dynconv.compose import CONFIG_DIR
    from dynconv.config import ConfigError, register_resolvers
    from dynconv.config_checks import OP_SECTION, check_section
    from dynconv.ops import OperatorConfigError

    if op not in op_names():
        raise ConfigError(f"op={op!r} is not known; allowed values: {', '.join(op_names())}")
    register_resolvers()
    root = OmegaConf.create({"op": OmegaConf.load(CONFIG_DIR / "op" / f"{op}.yaml")})
    allowed = [key for key in root.op if key != "name"]
    for key, value in knobs.items():
        if key not in allowed:
            raise ConfigError(f"{key}={value!r} is not a knob of op={op}; allowed knobs: {', '.join(allowed)}")
        OmegaConf.update(root, f"op.{key}", value, merge=False)
    cfg = OmegaConf.to_container(root, resolve=True)["op"]
    check_section({"op": cfg}, OP_SECTION, ConfigError)
    try:
        make_operator(cfg)
    except OperatorConfigError as error:
        raise ConfigError(str(error)) from None
    return cfg
