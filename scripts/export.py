"""A trained classification model out of dynconv: ONNX or torch.export with a dynamic batch, or the folded plain
model of a reparameterisation operator, each checked against the eager model (docs/export.md).

    python scripts/export.py checkpoint=outputs/resnet18-condconv-digits/17cf93838f format=onnx out=model.onnx
    python scripts/export.py checkpoint=outputs/resnet18-condconv-digits/17cf93838f format=torch_export \
        out=model.pt2 batch_sizes=[1,16]
    python scripts/export.py checkpoint=outputs/resnet18-lwe-digits/2c41a9e0b3 format=folded out=resnet18.pt

The model is rebuilt from the checkpoint (`dynconv.load`) and exported in eval mode. The last stdout line is one
JSON object: {"format", "path", "max_abs_diff", "batch_sizes", "tolerance", "within_tolerance", "opset", ...}
(`dynconv.export`'s report, plus "checkpoint"). Exit codes: 0 exported and within the tolerance; 2 a bad config, a
missing or unreadable checkpoint (named); 1 the export failed (the layer and why) or the difference to eager is
above `tolerance`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)

SUFFIXES = {"onnx": ".onnx", "torch_export": ".pt2", "folded": ".folded.pt"}


def config(argv: list[str]):
    """The composed config of these command-line arguments (exit 2 on a bad one); nothing runs.
    tests/test_docs_commands.py composes every documented command of this script through it."""
    return compose_or_exit("export", argv, validate="none")


def settings(cfg) -> dict:
    """The validated settings; ConfigError naming the key and the allowed values."""
    from dynconv.config import ConfigError
    from dynconv.exporting import EXPORT_FORMATS
    from dynconv.knobs import Knobs

    knobs = Knobs(cfg, error=ConfigError)
    if cfg.checkpoint is None:
        raise ConfigError("checkpoint=null: give a checkpoint file or a run folder (checkpoint=outputs/<run folder>)")
    checkpoint = Path(str(cfg.checkpoint))
    if not checkpoint.exists():
        raise ConfigError(f"checkpoint={checkpoint}: no such file or folder")
    format = knobs.choice("format", EXPORT_FORMATS)
    out = Path(str(cfg.out)) if cfg.out is not None else _default_out(checkpoint, format)
    return {"checkpoint": checkpoint, "format": format, "out": out,
            "weights": knobs.choice("weights", ("model", "ema")),
            "batch_sizes": knobs.numbers("batch_sizes", low=1, integers=True),
            "image_size": knobs.integer("image_size", low=8, nullable=True),
            "tolerance": knobs.number("tolerance", 0, inclusive=True),
            "opset": knobs.integer("opset", low=7, nullable=True), "optimize": knobs.flag("optimize")}


def _default_out(checkpoint: Path, format: str) -> Path:
    from dynconv.engine.checkpoint import checkpoint_in_run

    file = checkpoint_in_run(checkpoint) if checkpoint.is_dir() else checkpoint
    file = file or checkpoint / "model"
    return file.with_name(file.stem + SUFFIXES[format])


def main(argv: list[str]) -> int:
    cfg = config(argv)
    import torch

    import dynconv
    from dynconv.config import ConfigError
    from dynconv.engine.checkpoint import CorruptCheckpointError
    from dynconv.exporting import ExportError, export

    try:
        chosen = settings(cfg)
        model = dynconv.load(chosen["checkpoint"], weights=chosen["weights"])
    except (ConfigError, CorruptCheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    side = chosen["image_size"] or model.dynconv_config["image_size"]
    example = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    try:
        report = export(model, chosen["out"], chosen["format"], example_input=example,
                        batch_sizes=chosen["batch_sizes"], tolerance=chosen["tolerance"], opset=chosen["opset"],
                        optimize=chosen["optimize"])
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        print(json.dumps({"format": chosen["format"], "path": str(chosen["out"]), "error": str(error),
                          "layer": error.layer, "checkpoint": str(chosen["checkpoint"])}))
        return 1
    report = {**report, "checkpoint": str(chosen["checkpoint"])}
    print(f"{chosen['format']}: {report['path']} (max abs difference to eager {report['max_abs_diff']:.3g} at batch "
          f"sizes {', '.join(map(str, report['batch_sizes']))}; tolerance {report['tolerance']:g})")
    if not report["within_tolerance"]:
        print(f"error: the exported model differs from eager by {report['max_abs_diff']:.3g}, more than "
              f"tolerance={report['tolerance']:g}", file=sys.stderr)
    print(json.dumps(report))
    return 0 if report["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
