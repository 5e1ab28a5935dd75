"""Convert a reference release's checkpoint into a dynconv checkpoint (docs/pretrained.md).

    python scripts/import_checkpoint.py source=kernelwarehouse checkpoint=kw1x_resnet18.pth out=kw1x_resnet18.pt backbone=resnet18 op=kw op.b=1 data=imagenet
    python scripts/import_checkpoint.py source=odconv checkpoint=od_resnet18_4x.pth.tar out=od4x_resnet18.pt backbone=resnet18 op=odconv op.kernels=4 data=imagenet
    python eval.py checkpoint=kw1x_resnet18.pt data.root=/datasets/imagenet

`source`, `checkpoint`, `out` and `weights` are this script's keys (configs/import_checkpoint.yaml); every other
argument is a train.py override, composed as train.py composes it: the model the checkpoint is loaded into
(`backbone=`, `op=`, `op.*`: the release's model) and the data / recipe stored with it. Releases: OSVAI/
KernelWarehouse (ResNet18 at 1/4x, 1/2x, 1x, 2x, 4x; ResNet50 at 1/2x, 1x, 4x; MobileNetV2 1.0 / 0.5 at 1/2x, 1x, 4x;
ConvNeXt-T at 1x with op.layout=release) and OSVAI/ODConv (ResNet18 / 50, MobileNetV2 1.0 / 0.75 / 0.5, 1x and 4x).

Prints what it mapped, then, as the last stdout line, one JSON object: {"source", "checkpoint", "out", "backbone",
"op", "keys_mapped", "keys_set" (what the release does not store, e.g. {"tau=0": 19}), "num_classes", "weights",
"params"}. Exit 2: a bad config (naming the key and the allowed values), a missing or unreadable checkpoint (naming
its path); exit 1: a checkpoint whose layout does not fit the model (naming the keys or layers that differ).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)

from dynconv.config import ConfigError  # noqa: E402

OWN_KEYS = ("source", "checkpoint", "out", "weights")  # configs/import_checkpoint.yaml


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's `key=value` arguments, the train.py overrides)."""
    own = [arg for arg in argv if arg.partition("=")[0] in OWN_KEYS]
    return own, [arg for arg in argv if arg not in own]


def config(argv: list[str]):
    """(the script's settings, the composed train config), validated without reading the checkpoint (exit 2 on a bad
    one). tests/test_docs_commands.py composes every documented command of this script through it."""
    from omegaconf import OmegaConf

    from dynconv.pretrained.import_release import check_import_config

    own, overrides = split_arguments(argv)
    settings = compose_or_exit("import_checkpoint", own, validate="none")
    cfg = compose_or_exit("train", overrides, validate="model")
    try:
        for key in ("source", "checkpoint", "out"):
            value = OmegaConf.select(settings, key, throw_on_missing=False)
            if OmegaConf.is_missing(settings, key) or not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{key} is required: {key}=<{'kernelwarehouse | odconv' if key == 'source' else 'path'}>"
                                  f" ({'the release' if key != 'out' else 'the dynconv checkpoint to write'})")
        if settings.weights not in ("model", "ema"):
            raise ConfigError(f"weights={settings.weights!r} is invalid; allowed values: model, ema")
        check_import_config(settings.source, cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return settings, cfg


def main(argv: list[str]) -> int:
    settings, cfg = config(argv)
    from dynconv.engine.checkpoint import CorruptCheckpointError, atomic_save
    from dynconv.pretrained.import_release import import_release
    from dynconv.pretrained.reference_layouts import LayoutMismatch

    try:
        payload, record = import_release(settings.source, settings.checkpoint, cfg, settings.weights)
    except LayoutMismatch as error:
        print(f"error: the checkpoint does not fit: {error}", file=sys.stderr)
        return 1
    except (ConfigError, CorruptCheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(settings.out)
    atomic_save(payload, out)
    record["out"] = str(out)
    print(f"{settings.source} {record['backbone']} -> {out}: {record['keys_mapped']} keys mapped, set: "
          f"{record['keys_set'] or 'nothing'}; evaluate with: python eval.py checkpoint={out}")
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
