"""DyNet (Zhang et al. 2020) Figures 2, 6 and 7.

- `dynet_fig2` (Sec. 3.1, Fig. 2): the distribution of the Pearson correlation between the feature maps of one
  layer, for "well-known networks": one panel per classification checkpoint trained with op=static.
- `dynet_fig6` (Sec. 4.3, Fig. 6): the same for a static network and its dynamic twin, overlaid: MobileNetV2 (1.0)
  against Dy-MobileNetV2 (1.0) (`backbone=mobilenetv2_100 op=dynet`, the same channels; not Dy-mobile) over the
  160 maps of the 7th stage. Any per-sample dynamic operator is accepted (op=dynet first), with a static
  checkpoint of the same backbone.
- `dynet_fig7` (Sec. 4.3, Fig. 7): the latency reduced ratio 100% - L_Dym / L_Fix of Dy-mobile
  (`backbone=dynet_mobile op=dynet`) against MobileNetV2 (1.0) (`backbone=mobilenetv2_100 op=static`) at batch
  1 against the input size, measured on this machine; the paper prints one point of the curve, Table 2's 224 px
  CPU latencies (58.3 ms against 109.1 ms), drawn beside it.

Correlations (`dynconv.analysis.feature_correlation`): every channel is a variable, every (image, position) of the
first `correlation.images` validation images one observation; S / M / W / N bin |r| at `correlation.thresholds`
(the paper names the bins without bounds). The layer (`correlation.layer`, null): MobileNetV2's 7th stage
(timm's `blocks.5`, 160 channels at width 1.0) for the mobilenetv2_* backbones, else the last stage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dynconv.figures.context import PER_SAMPLE_OPS, FigureContext, LoadedRun, RunRef
from dynconv.figures.registry import MissingInput, figure

STRENGTH_COLOURS = {"S": "#d62728", "M": "#ff7f0e", "W": "#bcbd22", "N": "#2ca02c"}
FIG6_BACKBONE = "mobilenetv2_100"  # the paper's pair: MobileNetV2 (1.0) and Dy-MobileNetV2 (1.0)
FIG7_MODELS = {  # DyNet Fig. 7 / Table 2: Dy-mobile (1.0) against MobileNetV2 (1.0)
    "dynamic": ("dynet_mobile", "dynet"),
    "static": ("mobilenetv2_100", "static"),
}
FIG7_TABLE, FIG7_ROWS = "dynet_t2", {"dynamic": "dy_mobile_1_0", "static": "mnv2_1_0"}
LATENCY_NUM_CLASSES = 1000  # ImageNet's classifier, as scripts/bench.py times


# ------------------------------------------------------------------------------------------- correlations


def _thresholds(ctx: FigureContext) -> tuple[float, float, float]:
    from dynconv.analysis.feature_correlation import THRESHOLDS

    value = ctx.cfg.correlation.get("thresholds")
    return THRESHOLDS if value is None else tuple(float(t) for t in value)


def correlation_of(ctx: FigureContext, ref: RunRef) -> dict[str, Any]:
    """The correlation summary (histogram, S/M/W/N fractions, sizes) of `ref`'s layer over the validation images."""
    from dynconv.analysis.feature_correlation import FeatureCorrelation, resolve_layer, summarize

    run: LoadedRun = ctx.load(ref)
    chosen = ctx.cfg.correlation.layer
    layer = resolve_layer(run.model, None if chosen is None else str(chosen))
    limit = ctx.cfg.correlation.images
    images = 0
    run.model.eval()
    with FeatureCorrelation(run.model, layer) as recorder, ctx.no_grad():
        for batch, _ in ctx.batches(run, None if limit is None else int(limit)):
            run.model(batch)
            images += batch.shape[0]
    summary = summarize(recorder.stats, int(ctx.cfg.correlation.bins), _thresholds(ctx))
    return {"label": ref.label, "checkpoint": str(ref.checkpoint), "backbone": ref.backbone, "op": ref.op,
            "layer": layer, "images": images, **summary}


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key != "values"}


def _histogram_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for entry in entries:
        edges, counts = entry["histogram"]["edges"], entry["histogram"]["counts"]
        total = max(sum(counts), 1)
        for low, high, count in zip(edges[:-1], edges[1:], counts):
            rows.append({"network": entry["label"], "checkpoint": entry["checkpoint"], "layer": entry["layer"],
                         "bin_low": low, "bin_high": high, "pairs": count, "fraction": count / total})
    return rows


def _strength_bands(ax, thresholds) -> None:
    """Shade |r| in the N / W / M / S ranges and letter them along the top, as the paper's panels do."""
    bounds = [0.0, *thresholds, 1.0]
    keys = ["N", "W", "M", "S"]
    for key, low, high in zip(keys, bounds[:-1], bounds[1:]):
        for sign in (1, -1):
            ax.axvspan(sign * low, sign * high, color=STRENGTH_COLOURS[key], alpha=0.07, linewidth=0)
            ax.text(sign * (low + high) / 2, 0.98, key, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=7, color=STRENGTH_COLOURS[key])


def _fractions_text(fractions: dict[str, float]) -> str:
    return "  ".join(f"{key} {100 * fractions[key]:.1f}%" for key in ("S", "M", "W", "N"))


def _draw_histogram(ax, entry: dict[str, Any], *, label: str | None = None, colour: str = "#1f77b4",
                    step: bool = False) -> None:
    edges = np.asarray(entry["histogram"]["edges"])
    counts = np.asarray(entry["histogram"]["counts"], dtype=np.float64)
    fractions = counts / max(counts.sum(), 1.0)
    if step:
        ax.stairs(fractions, edges, label=label, color=colour, linewidth=1.6)
    else:
        ax.stairs(fractions, edges, label=label, color=colour, fill=True, alpha=0.75)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xlabel("Pearson correlation r between two feature maps", fontsize=8)
    ax.set_ylabel("fraction of channel pairs", fontsize=8)
    ax.tick_params(labelsize=7)


def _layer_note(entry: dict[str, Any]) -> str:
    dead = f", {entry['constant_channels']} constant" if entry["constant_channels"] else ""
    return f"{entry['layer']} ({entry['channels']} maps{dead}), {entry['images']} images"


@figure("dynet_fig2", "dynet", "Pearson correlation between one layer's feature maps of static networks (Fig. 2)",
        "classification checkpoints trained with op=static (one panel each; the paper: well-known networks); "
        "their validation split; correlation.layer / images / bins / thresholds")
def dynet_fig2(ctx: FigureContext) -> dict[str, Any]:
    refs = [ref for ref in ctx.candidates() if ref.task == "classification" and ref.op == "static"]
    if not refs:
        given = ", ".join(f"{ref.label} ({ref.checkpoint})" for ref in ctx.candidates()) or "none"
        raise MissingInput("a classification checkpoint trained with op=static, one per network to show (the paper "
                           "shows well-known networks: python train.py backbone=mobilenetv2_100 op=static, "
                           f"backbone=resnet50 op=static, ...) (checkpoints given: {given})")
    from dynconv.figures.output import new_figure

    thresholds = _thresholds(ctx)
    entries = [correlation_of(ctx, ref) for ref in refs]
    columns = min(len(entries), 3)
    rows = -(-len(entries) // columns)
    fig, axes = new_figure(ncols=columns, nrows=rows, size=(4.4, 3.4))
    flat = list(axes.flat)
    for ax, entry in zip(flat, entries):
        _strength_bands(ax, thresholds)
        _draw_histogram(ax, entry)
        ax.set_title(f"{entry['label']}: {_layer_note(entry)}\n{_fractions_text(entry['fractions'])}", fontsize=7)
    for ax in flat[len(entries):]:
        ax.axis("off")
    fig.suptitle("Pearson correlation between feature maps (DyNet Fig. 2); S/M/W/N: |r| >= "
                 f"{thresholds[2]}, [{thresholds[1]}, {thresholds[2]}), [{thresholds[0]}, {thresholds[1]}), "
                 f"< {thresholds[0]}", fontsize=8)
    fig.tight_layout()
    data = {"figure": "dynet_fig2", "thresholds": list(thresholds),
            "observations": "every (image, spatial position) of the first correlation.images validation images",
            "networks": [_public(entry) for entry in entries]}
    ctx.save("dynet_fig2", fig, data=data, rows=_histogram_rows(entries))
    return {"networks": [{"label": entry["label"], "checkpoint": entry["checkpoint"], "layer": entry["layer"],
                          "fractions": entry["fractions"]} for entry in entries]}


def _fig6_pair(ctx: FigureContext) -> tuple[RunRef, RunRef]:
    """(static, dynamic) checkpoints of one backbone: the paper's mobilenetv2_100 first, op=dynet first."""
    candidates = [ref for ref in ctx.candidates() if ref.task == "classification"]
    dynamic = [ref for ref in candidates if ref.op in PER_SAMPLE_OPS]
    if not dynamic:
        given = ", ".join(f"{ref.label} ({ref.checkpoint})" for ref in ctx.candidates()) or "none"
        raise MissingInput("a classification checkpoint trained with a dynamic op, to compare with its static twin "
                           f"(the paper: Dy-MobileNetV2 (1.0), python train.py backbone={FIG6_BACKBONE} op=dynet; "
                           f"any of op={', '.join(PER_SAMPLE_OPS)} is accepted) (checkpoints given: {given})")
    dynamic.sort(key=lambda ref: (ref.smoke, ref.op != "dynet", ref.backbone != FIG6_BACKBONE))
    for candidate in dynamic:
        static = [ref for ref in candidates if ref.op == "static" and ref.backbone == candidate.backbone]
        if static:
            return static[0], candidate
    first = dynamic[0]
    raise MissingInput(f"a checkpoint of backbone={first.backbone} trained with op=static, the static twin of "
                       f"{first.label} ({first.checkpoint}) (python train.py backbone={first.backbone} op=static)")


@figure("dynet_fig6", "dynet", "Feature-map correlation: a static network against its dynamic twin (Fig. 6)",
        f"two classification checkpoints of one backbone, op=static and a dynamic op (the paper: {FIG6_BACKBONE} "
        "op=static and op=dynet); their validation split; correlation.layer / images / bins / thresholds")
def dynet_fig6(ctx: FigureContext) -> dict[str, Any]:
    static_ref, dynamic_ref = _fig6_pair(ctx)
    from dynconv.figures.output import new_figure

    thresholds = _thresholds(ctx)
    entries = {"static": correlation_of(ctx, static_ref), "dynamic": correlation_of(ctx, dynamic_ref)}
    colours = {"static": "#1f77b4", "dynamic": "#d62728"}
    fig, axes = new_figure(ncols=2, size=(4.6, 3.6))
    ax = axes[0, 0]
    _strength_bands(ax, thresholds)
    for name, entry in entries.items():
        _draw_histogram(ax, entry, label=f"{entry['label']} (mean |r| {entry['mean_abs_r']:.3f})",
                        colour=colours[name], step=True)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: the S/M/W/N letters stay free
    ax.set_title(f"{_layer_note(entries['static'])}", fontsize=8)
    bars = axes[0, 1]
    keys = ["S", "M", "W", "N"]
    positions = np.arange(len(keys))
    for offset, (name, entry) in zip((-0.2, 0.2), entries.items()):
        values = [100 * entry["fractions"][key] for key in keys]
        bars.bar(positions + offset, values, width=0.4, color=colours[name], label=entry["label"])
        for x, value in zip(positions + offset, values):
            bars.text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=6)
    bars.set_xticks(positions, [f"{key}\n{label}" for key, label in
                                zip(keys, (f"|r|>={thresholds[2]}", f"[{thresholds[1]},{thresholds[2]})",
                                           f"[{thresholds[0]},{thresholds[1]})", f"<{thresholds[0]}"))], fontsize=7)
    bars.set_ylabel("% of channel pairs", fontsize=8)
    bars.tick_params(labelsize=7)
    bars.legend(fontsize=7)
    fig.suptitle("Pearson correlation between feature maps, static vs dynamic kernels (DyNet Fig. 6)", fontsize=9)
    fig.tight_layout()
    data = {"figure": "dynet_fig6", "thresholds": list(thresholds),
            "observations": "every (image, spatial position) of the first correlation.images validation images",
            **{name: _public(entry) for name, entry in entries.items()}}
    ctx.save("dynet_fig6", fig, data=data, rows=_histogram_rows(list(entries.values())))
    return {name: {"label": entry["label"], "layer": entry["layer"], "fractions": entry["fractions"],
                   "mean_abs_r": entry["mean_abs_r"]} for name, entry in entries.items()}


# ------------------------------------------------------------------------------------------------ latency


def latency_models(device: torch.device) -> dict[str, Any]:
    """Dy-mobile (op=dynet) and MobileNetV2 (1.0) (op=static) built from their configs' defaults (as train.py and
    scripts/bench.py compose them), in eval mode on `device`, folded for inference as bench.py times them."""
    from omegaconf import OmegaConf

    from dynconv import benchmark as bm
    from dynconv.build import build_backbone
    from dynconv.compose import compose_or_exit

    models = {}
    for name, (backbone, op) in FIG7_MODELS.items():
        cfg = compose_or_exit("train", [f"backbone={backbone}", f"op={op}"], validate="model")
        torch.manual_seed(0)
        built = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn,
                               num_classes=LATENCY_NUM_CLASSES, image_size=int(cfg.backbone.default_resolution))
        model, _ = bm.inference_model(built.backbone.to(device))
        models[name] = model.eval()
    return models


def _inference_step(model: torch.nn.Module, inputs: torch.Tensor):
    def step() -> None:
        with torch.inference_mode():
            model(inputs)

    return step


def paper_point() -> dict[str, Any]:
    """Table 2's CPU latencies of Dy-mobile (1.0) and MobileNetV2 (1.0) at 224 px: the printed point of Fig. 7."""
    from dynconv.reproduction.tables import load_table

    table = load_table(FIG7_TABLE)
    dynamic_ms = float(table.row(FIG7_ROWS["dynamic"]).paper["infer_ms"])
    static_ms = float(table.row(FIG7_ROWS["static"]).paper["infer_ms"])
    return {"resolution": 224, "dynamic_ms": dynamic_ms, "static_ms": static_ms, "ratio": dynamic_ms / static_ms,
            "reduced_ratio_pct": 100.0 * (1.0 - dynamic_ms / static_ms), "source": f"{FIG7_TABLE} (Table 2)",
            "setting": table.column("infer_ms").note}


def _latency_device(ctx: FigureContext) -> torch.device:
    choice = str(ctx.cfg.latency.get("device") or "cpu")
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"latency.device={choice!r} is invalid; allowed values: cpu, auto, cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("latency.device='cuda' but no CUDA device is available; allowed values here: cpu, auto")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda", 0) if use_cuda else torch.device("cpu")


def _measure(models: dict[str, torch.nn.Module], resolutions: list[int], repeats: int, warmup: int,
             device: torch.device) -> list[dict[str, Any]]:
    """Per input size: the medians of batch-1 inference of both models, timed alternately (dynamic, static,
    dynamic, ...) by `dynconv.benchmark.interleaved` after `warmup` untimed passes of each."""
    from dynconv import benchmark as bm

    rows = []
    for resolution in resolutions:
        torch.manual_seed(0)
        inputs = torch.randn(1, 3, resolution, resolution, device=device)
        timed = bm.interleaved({name: {"batch1": _inference_step(model, inputs)} for name, model in models.items()},
                               device=device, repeats=repeats, warmup=warmup, steps=1)
        dynamic_ms, static_ms = timed["dynamic"]["batch1"].ms, timed["static"]["batch1"].ms
        rows.append({
            "resolution": resolution,
            "dynamic_ms": dynamic_ms,
            "static_ms": static_ms,
            "ratio": dynamic_ms / static_ms,
            "reduced_ratio_pct": 100.0 * (1.0 - dynamic_ms / static_ms),
            "dynamic_samples_ms": list(timed["dynamic"]["batch1"].samples),
            "static_samples_ms": list(timed["static"]["batch1"].samples),
        })
    return rows


@figure("dynet_fig7", "dynet", "Latency reduced ratio of Dy-mobile against MobileNetV2 (1.0) vs input size (Fig. 7)",
        "nothing: measured on this machine (latency.resolutions / repeats / warmup / device / threads); the paper's "
        "224 px point from dynet_t2")
def dynet_fig7(ctx: FigureContext) -> dict[str, Any]:
    from dynconv.figures.output import new_figure
    from dynconv.functional import selector

    settings = ctx.cfg.latency
    resolutions = [int(value) for value in settings.resolutions]
    repeats, warmup = int(settings.repeats), int(settings.warmup)
    if not resolutions or min(resolutions) < 32 or repeats < 1 or warmup < 0:
        raise ValueError(f"latency: resolutions must be integers >= 32, repeats >= 1, warmup >= 0; got "
                         f"resolutions={resolutions}, repeats={repeats}, warmup={warmup}")
    device = _latency_device(ctx)
    threads = settings.get("threads")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"latency.threads={threads!r} is invalid; allowed values: null or an integer >= 1")
    default_threads = torch.get_num_threads()
    torch.set_num_threads(default_threads if threads is None else int(threads))
    try:
        models = latency_models(device)
        rows = _measure(models, resolutions, repeats, warmup, device)
    finally:
        used_threads = torch.get_num_threads()
        torch.set_num_threads(default_threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {used_threads} threads"
    paper = paper_point()

    fig, axes = new_figure(ncols=2, size=(4.6, 3.6))
    ax = axes[0, 0]
    ax.plot([row["resolution"] for row in rows], [row["reduced_ratio_pct"] for row in rows], "o-",
            color="#1f77b4", label=f"measured ({where})")
    ax.plot([paper["resolution"]], [paper["reduced_ratio_pct"]], "*", markersize=12, color="#d62728",
            label=f"paper, Table 2 ({paper['setting']})")
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel("input size (px), batch 1", fontsize=8)
    ax.set_ylabel("latency reduced ratio 100% - L_Dym / L_Fix (%)", fontsize=8)
    ax.set_title("Dy-mobile (1.0) vs MobileNetV2 (1.0)", fontsize=8)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)
    ms = axes[0, 1]
    for name, colour, label in (("static", "#1f77b4", "MobileNetV2 (1.0), L_Fix"),
                                ("dynamic", "#d62728", "Dy-mobile (1.0), L_Dym")):
        ms.plot([row["resolution"] for row in rows], [row[f"{name}_ms"] for row in rows], "o-", color=colour,
                label=label)
    ms.set_xlabel("input size (px), batch 1", fontsize=8)
    ms.set_ylabel(f"median latency over {repeats} interleaved repeats (ms)", fontsize=8)
    ms.legend(fontsize=7)
    ms.tick_params(labelsize=7)
    fig.suptitle("DyNet Fig. 7: latency for different input sizes", fontsize=9)
    fig.tight_layout()

    data = {"figure": "dynet_fig7", "device": device.type, "device_name": where, "threads": used_threads,
            "batch": 1, "repeats": repeats, "warmup": warmup, "steps": 1,
            "timing": "eval mode, torch.inference_mode; models alternated every repeat; median of the repeats",
            "models": {name: {"backbone": backbone, "op": op} for name, (backbone, op) in FIG7_MODELS.items()},
            "conv_algorithm_policy": selector.get_policy(), "rows": rows, "paper": paper}
    csv_rows = [{key: value for key, value in row.items() if not key.endswith("samples_ms")} for row in rows]
    ctx.save("dynet_fig7", fig, data=data, rows=csv_rows)
    return {"reduced_ratio_pct": {str(row["resolution"]): round(row["reduced_ratio_pct"], 2) for row in rows},
            "paper_224_reduced_ratio_pct": round(paper["reduced_ratio_pct"], 2), "device": where}
