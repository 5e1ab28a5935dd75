"""Accuracy against cost: WeightNet Figure 1 and DyNet Figure 5, from collected runs beside the papers' points.

WeightNet Fig. 1 (Ma et al., ECCV 2020): top-1 of ShuffleNetV2 (0.5x-2.0x) against FLOPs (a) and against
parameters (b), static / SE / SK / CondConv / WeightNet. Its points are the ShuffleNetV2 rows of Tables 2-4, so
the paper's side is read from `dynconv/reproduction/tables/wn_t2..4.yaml` and dynconv's side is each row's run
(`reproduce.py launch table=wn_t4 ...`, matched as `reproduce.py show` matches them) at the row's counts, computed on
the spot at the paper's 224 px and 1000 classes.

DyNet Fig. 5 (Zhang et al., 2020): top-1 against FLOPs of MobileNetV2 and Dy-MobileNetV2 (same channels, op=dynet)
across width multipliers. The paper prints no number for it; the MobileNetV2 points it can be checked against are
Table 1's (1.0, and the 0.75 and 0.6 widths it quotes from Sandler et al.). dynconv's points are every run of a
`mobilenetv2_*` backbone with op=static or op=dynet, counted the same way.

A smoke run (two steps on the digits) has counts but no meaningful accuracy: it is drawn only when a row has no full
run and `tradeoff.include_smoke=true`, with an x marker and "smoke" in the data.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from dynconv.figures.context import FigureContext
from dynconv.figures.registry import MissingInput, figure

WN_TABLES = ("wn_t2", "wn_t3", "wn_t4")
DYNET_PAPER_ROWS = ("mnv2_1_0", "mnv2_0_75", "mnv2_0_6")
FAMILY_STYLE = {"static": ("tab:gray", "o"), "SE": ("tab:blue", "s"), "SK": ("tab:purple", "D"),
                "CondConv": ("tab:orange", "^"), "WeightNet": ("tab:red", "*"), "DyNet": ("tab:red", "*")}


def family(overrides) -> str:
    """The operator family a row or run belongs to, from its overrides (attn=se is SE on a static network)."""
    overrides = set(overrides)
    if "attn=se" in overrides:
        return "SE"
    for op, name in (("op=sk", "SK"), ("op=condconv", "CondConv"), ("op=weightnet", "WeightNet"),
                     ("op=dynet", "DyNet")):
        if op in overrides:
            return name
    return "static"


def _usable(run: dict[str, Any] | None, include_smoke: bool) -> bool:
    return bool(run) and run["metrics"].get("top1") is not None and (include_smoke or not run["smoke"])


def wn_points(ctx: FigureContext) -> list[dict[str, Any]]:
    """One record per ShuffleNetV2 row of Tables 2-4: the paper's params/MACs/top-1 and, where a run exists,
    dynconv's counts and top-1."""
    from dynconv.reproduction.counting import composer, count_rows
    from dynconv.reproduction.results import runs_for_table
    from dynconv.reproduction.tables import load_table

    runs = ctx.results("collected runs of the WeightNet tables (python scripts/reproduce.py launch table=wn_t4 ...)")
    include_smoke = bool(ctx.cfg.tradeoff.include_smoke)
    smoke_runs = [run for run in runs if run["smoke"]]
    points, cache, seen = [], {}, {}
    with composer() as compose:
        for table_id in WN_TABLES:
            table = load_table(table_id)
            rows = [row for row in table.rows if any(o.startswith("backbone=shufflenetv2") for o in row.overrides)]
            chosen = runs_for_table(table, runs)
            counts = None
            for row in rows:
                model_key = frozenset(row.overrides)
                if model_key in seen:  # the same network in another table (the baselines repeat): one point
                    seen[model_key].setdefault("also_in", []).append(f"{table_id}/{row.id}")
                    continue
                run = chosen.get(row.id)
                if not _usable(run, include_smoke) and include_smoke:
                    run = next((r for r in smoke_runs if (r["table"], r["row"]) == (table_id, row.id)), None)
                if not _usable(run, include_smoke):
                    run = None
                if run is not None and counts is None:
                    counts = count_rows(table, compose, cache)
                width = next(o for o in row.overrides if o.startswith("backbone=")).split("_x")[-1].replace("_", ".")
                record = {"table": table_id, "row": row.id, "family": family(row.overrides), "width": width,
                          "paper_params_M": row.paper.get("params"), "paper_macs_M": row.paper.get("macs"),
                          "paper_top1": None if row.paper.get("top1_err") is None else 100 - row.paper["top1_err"]}
                if run is not None:
                    values = counts[row.id].values
                    record.update(params_M=values.get("params", 0) / 1e6, macs_M=values.get("macs", 0) / 1e6,
                                  top1=run["metrics"]["top1"], smoke=run["smoke"], run_dir=run["run_dir"])
                seen[model_key] = record
                points.append(record)
    return points


def paper_scale_counts(config: dict[str, Any]) -> tuple[float, float]:
    """(params M, MACs M) of a run's backbone x op x attention as the papers count them: at the backbone's default
    resolution and 1000 classes, on the meta device (`reproduce.py`'s counting)."""
    from dynconv.reproduction.counting import count_config

    cfg = OmegaConf.create(config)
    OmegaConf.update(cfg, "data.num_classes", 1000, force_add=True)
    OmegaConf.update(cfg, "data.image_size", int(cfg.backbone.get("default_resolution", 224) or 224), force_add=True)
    values = count_config(cfg, ("params", "macs"))
    return values["params"] / 1e6, values["macs"] / 1e6


def _scatter(ax, points, x_key, paper_x_key, title, xlabel):
    families = sorted({p["family"] for p in points}, key=list(FAMILY_STYLE).index)
    for name in families:
        color, marker = FAMILY_STYLE[name]
        paper = sorted((p[paper_x_key], p["paper_top1"]) for p in points
                       if p["family"] == name and p.get(paper_x_key) is not None and p.get("paper_top1") is not None)
        if paper:
            ax.plot(*zip(*paper), linestyle="--", marker=marker, color=color, fillstyle="none", alpha=0.7,
                    label=f"{name} (paper)")
        ours = sorted((p[x_key], p["top1"], p.get("smoke")) for p in points
                      if p["family"] == name and p.get("top1") is not None)
        if ours:
            xs, ys, smoke = zip(*ours)
            ax.plot(xs, ys, linestyle="-", marker=marker, color=color, label=f"{name} (dynconv)")
            for x, y, is_smoke in ours:
                if is_smoke:
                    ax.plot([x], [y], marker="x", color="black", markersize=9)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


@figure("wn_fig1", "wn", "Accuracy vs FLOPs and vs parameters, ShuffleNetV2 x static/SE/SK/CondConv/WeightNet",
        "runs= with collected runs of the wn_t2/wn_t3/wn_t4 rows (reproduce.py launch); the paper's points from "
        "the table files")
def wn_fig1(ctx: FigureContext) -> dict[str, Any]:
    from dynconv.figures.output import new_figure

    points = wn_points(ctx)
    measured = [p for p in points if p.get("top1") is not None]
    if not measured:
        smoke_hint = "" if ctx.cfg.tradeoff.include_smoke else " (smoke runs are left out: tradeoff.include_smoke=false)"
        raise MissingInput(f"runs of the ShuffleNetV2 rows of {', '.join(WN_TABLES)} under runs={ctx.cfg.runs}"
                           f"{smoke_hint}: python scripts/reproduce.py launch table=wn_t4 runs=<folder>")
    fig, axes = new_figure(ncols=2, size=(5.2, 4.2))
    _scatter(axes[0][0], points, "macs_M", "paper_macs_M", "(a) accuracy vs FLOPs", "MFLOPs (multiply-adds)")
    _scatter(axes[0][1], points, "params_M", "paper_params_M", "(b) accuracy vs parameters", "parameters (M)")
    fig.suptitle("WeightNet Fig. 1: ShuffleNetV2 on ImageNet (paper dashed, dynconv solid, x = smoke run)", fontsize=9)
    fig.tight_layout()
    ctx.save("wn_fig1", fig, data={"figure": "wn_fig1", "points": points}, rows=points)
    return {"rows_with_runs": len(measured), "rows": len(points)}


@figure("dynet_fig5", "dynet", "Top-1 vs FLOPs, MobileNetV2 and Dy-MobileNetV2 across width multipliers",
        "runs= with runs of backbone=mobilenetv2_* and op=static / op=dynet")
def dynet_fig5(ctx: FigureContext) -> dict[str, Any]:
    from dynconv.figures.output import new_figure
    from dynconv.reproduction.tables import load_table

    runs = ctx.results("runs of backbone=mobilenetv2_* with op=static and op=dynet")
    include_smoke = bool(ctx.cfg.tradeoff.include_smoke)
    points = []
    for run in runs:
        if not (run["backbone"] or "").startswith("mobilenetv2_") or run["op"] not in ("static", "dynet"):
            continue
        if run["task"] not in (None, "classification") or not _usable(run, include_smoke):
            continue
        config = _run_config(run["run_dir"])
        params, macs = paper_scale_counts(config)
        points.append({"family": "DyNet" if run["op"] == "dynet" else "static", "backbone": run["backbone"],
                       "macs_M": macs, "params_M": params, "top1": run["metrics"]["top1"], "smoke": run["smoke"],
                       "run_dir": run["run_dir"]})
    if not points:
        raise MissingInput(f"runs of backbone=mobilenetv2_050/060/075/100 with op=static and op=dynet under "
                           f"runs={ctx.cfg.runs} (e.g. python train.py -m backbone=mobilenetv2_050,mobilenetv2_100 "
                           "op=static,dynet data=imagenet recipe=dynet_imagenet)")
    table = load_table("dynet_t1")
    paper = []
    for row_id in DYNET_PAPER_ROWS:
        row = table.row(row_id)
        if row.paper.get("mflops") is not None:
            paper.append({"family": "static", "row": row_id, "label": row.label, "paper_macs_M": row.paper["mflops"],
                          "paper_top1": 100 - row.paper["top1_err"]})
    fig, axes = new_figure(size=(5.6, 4.4))
    _scatter(axes[0][0], points + paper, "macs_M", "paper_macs_M", "DyNet Fig. 5: MobileNetV2 vs Dy-MobileNetV2",
             "MFLOPs (multiply-adds)")
    fig.tight_layout()
    note = ("The paper prints no Dy-MobileNetV2 numbers for this figure; its MobileNetV2 points are Table 1's "
            "(1.0 and the 0.75 / 0.6 widths quoted from Sandler et al.).")
    ctx.save("dynet_fig5", fig, data={"figure": "dynet_fig5", "points": points, "paper": paper, "note": note},
             rows=points + paper)
    return {"runs": len(points)}


def _run_config(run_dir: str) -> dict[str, Any]:
    from pathlib import Path

    import yaml

    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
