"""The papers' figures from checkpoints, collected runs and measurements on this machine (docs/figures.md).

    python scripts/figures.py figure=list
    python scripts/figures.py figure=kw_fig3 checkpoint=outputs/<kw run> out=figures
    python scripts/figures.py figure=all checkpoint=[outputs/<run a>,outputs/<run b>] runs=results out=figures

Each figure is written as `<out>/<id>.png` with its data beside it (`<id>.csv` and/or `<id>.json`). `figure=all`
makes every figure whose inputs exist and reports the others with the input they miss. The last stdout line is one
JSON object: {"out": folder, "figures": {id: {"files": [...], ...}}, "missing": {id: "what is missing"}}.
Exit codes: 0 when every requested figure was written (or, for `all`, skipped for a missing input); 2 for a bad
config or a single requested figure whose input is missing; 1 when a figure failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)

from omegaconf import OmegaConf  # noqa: E402


def config(argv: list[str]):
    """The composed config of these command-line arguments (exit 2 on a bad one); nothing runs.
    tests/test_docs_commands.py composes every documented command of this script through it."""
    return compose_or_exit("figures", argv, validate="none")


def requested(cfg, known: list[str]) -> list[str]:
    from dynconv.config import ConfigError

    value = cfg.figure
    ids = [str(item) for item in value] if OmegaConf.is_list(value) else [str(value)]
    if ids == ["all"]:
        return known
    unknown = [item for item in ids if item not in known]
    if unknown:
        raise ConfigError(f"figure={','.join(unknown)} is not a figure; allowed values: all, list, "
                          f"{', '.join(known)}")
    return ids


def main(argv: list[str]) -> int:
    cfg = config(argv)
    from dynconv.config import ConfigError
    from dynconv.figures import FIGURES, figure_ids, make_figures

    known = figure_ids()
    if str(cfg.figure) == "list":
        for key in known:
            spec = FIGURES[key]
            print(f"{key:12s} {spec.title}\n{'':12s} reads: {spec.needs}")
        print(json.dumps({"figures": {key: {"title": FIGURES[key].title, "needs": FIGURES[key].needs}
                                      for key in known}}))
        return 0
    try:
        ids = requested(cfg, known)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = make_figures(cfg, ids)
    for key, reason in report["missing"].items():
        print(f"{key}: skipped, missing input: {reason}", file=sys.stderr)
    for key, reason in report["failed"].items():
        print(f"{key}: failed: {reason}", file=sys.stderr)
    print(json.dumps(report))
    if report["failed"]:
        return 1
    if report["missing"] and str(cfg.figure) != "all":
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
