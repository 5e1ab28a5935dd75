"""Weight Excitation (Quader et al., ECCV 2020) Figures 1a, 2, 3b, 4 and 5.

- `we_fig1` (Sec. 3.1, Fig. 1a): the decrease in performance D when the b-th percentile weight by magnitude of
  every convolution layer is zeroed, against b (`dynconv.analysis.weight_ablation.position_curve`; the paper:
  b = 1..100 on an ImageNet-pretrained ResNet50). A second panel, not in the paper, zeroes whole magnitude bins of
  one layer at a time (`ablation.bins`, one curve per layer and their mean).
- `we_fig2` (Sec. 3.1, Fig. 2): per 3x3 layer a 5x5 importance map: D when the 3x3 kernel between one of N1 = 5
  equidistant output channels and one of N2 = 5 equidistant input channels is zeroed. (A map over the 3x3 kernel
  positions would be another study; the paper's maps are over sampled channel pairs.)
- `we_fig3b` (Sec. 3.3, Fig. 3b): f_A(w) of Eq. 2 for several eps_A, from `dynconv.ops.we.magnitude`, with the
  gradient gain of Eq. 3 beside it (obtained by autograd through the same function). No inputs.
- `we_fig4` (Sec. 4.2, Fig. 4): per-epoch validation metric and training loss of the runs under `runs=`, read
  from their TensorBoard logs; panels as the paper's: (a) operators without feature attention, (b) with SE / BAM
  / CBAM, (c) the weight-normalising reparameterisations (WS / WN / SN) beside the LWE / baseline runs.
- `we_fig5` (Sec. 4.2, Fig. 5): (a) GroupNorm runs (`backbone.norm_layer=groupnorm`) beside their BatchNorm twins,
  (b) runs trained with AdamW and cosine annealing (the paper: warm restarts, `recipe=we_adamw_sgdr`; its last
  epoch top-1: ResNet50 70.9, ResNet50-SE 71.2, ResNet50-LWE 72.0).

The paper's Figures 4 and 5 draw training and validation accuracy. dynconv logs no training accuracy (the
training images are augmented, and mixed with mixup/CutMix where configured), so the training panel is the
mean training loss per epoch (`train/epoch_loss`); nothing stands in for the missing curve.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dynconv.figures.context import FigureContext, _read_config
from dynconv.figures.registry import MissingInput, figure

# Operators whose convolutions keep one plain kernel each (after folding), in the order tried: static is the paper's
# network. The others (CondConv, DY-Conv, ODConv, KernelWarehouse, WeightNet, DyNet) mix or generate their kernels
# per sample, so at most a stem or a shortcut would be left to ablate: their checkpoints are not used.
PLAIN_WEIGHT_OPS = ("static", "lwe", "mwe", "we", "weight_std", "weight_norm", "spectral_norm", "cgc", "dcd", "sk")
WE_OPS = ("lwe", "mwe", "we")
REPARAM_OPS = ("weight_std", "weight_norm", "spectral_norm")  # Fig. 4c's WS / WN / SN
METRICS = ("top1", "loss")
FIG5B_PAPER_TOP1 = {("static", "none"): 70.9, ("static", "se"): 71.2, ("lwe", "none"): 72.0}  # ResNet50, Sec. 4.2
TRAINING_ACCURACY_NOTE = ("the paper also draws training accuracy; dynconv does not log it, so the training panel is "
                          "train/epoch_loss (the mean training loss of each epoch, as trained: label smoothing, "
                          "mixup where configured)")


def _panel_letter(index: int) -> str:
    return f"({chr(ord('a') + index)})" if index < 26 else f"({index + 1})"


# ------------------------------------------------------------------------------------- weight ablation


def _ablation_settings(ctx: FigureContext) -> dict[str, Any]:
    settings = ctx.cfg.ablation
    values = {key: settings.get(key) for key in ("images", "metric", "percentiles", "bins", "channels", "max_layers")}
    checks = {"images": values["images"] is not None and int(values["images"]) >= 1,
              "percentiles": int(values["percentiles"]) >= 1, "bins": int(values["bins"]) >= 0,
              "channels": int(values["channels"]) >= 1,
              "max_layers": values["max_layers"] is None or int(values["max_layers"]) >= 1}
    allowed = {"images": "an integer >= 1", "percentiles": "an integer >= 1", "bins": "an integer >= 0",
               "channels": "an integer >= 1", "max_layers": "null or an integer >= 1"}
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"ablation.{key}={values[key]!r} is invalid; allowed values: {allowed[key]}")
    if values["metric"] not in METRICS:
        raise ValueError(f"ablation.metric={values['metric']!r} is invalid; allowed values: {', '.join(METRICS)}")
    layers = settings.get("layers")
    return {"images": int(values["images"]), "metric": str(values["metric"]),
            "percentiles": int(values["percentiles"]), "bins": int(values["bins"]),
            "channels": int(values["channels"]),
            "max_layers": None if values["max_layers"] is None else int(values["max_layers"]),
            "layers": None if layers is None else [str(name) for name in layers]}


class AblationSetup:
    """One checkpoint's network as it runs at inference, its convolutions, and the cached validation images."""

    def __init__(self, ctx: FigureContext, settings: dict[str, Any], figure_id: str):
        from dynconv.analysis import weight_ablation as wa

        self.ref = ctx.find(PLAIN_WEIGHT_OPS, prefer=PLAIN_WEIGHT_OPS, need=(
            f"{figure_id}: a classification checkpoint whose convolutions have plain weights (the paper: an "
            "ImageNet-pretrained ResNet50, python train.py backbone=resnet50 op=static; any of op="
            f"{', '.join(PLAIN_WEIGHT_OPS)}; operators that make their kernels per sample have none to zero)"))
        run = ctx.load(self.ref)
        self.model = wa.inference_model(run.model)
        self.layers = wa.conv_layers(self.model)
        with ctx.no_grad():
            images, targets = wa.cache_images(ctx.batches(run, settings["images"]))
        self.max_val_samples = run.run_cfg.data.get("max_val_samples")
        batch_size = run.run_cfg.recipe.get("eval_batch_size") or 256
        self.scorer = wa.CachedScorer(self.model, images, targets, int(batch_size))
        self.baseline = self.scorer()
        self.images = images.shape[0]

    def select(self, settings: dict[str, Any], figure_id: str, *, kernel_size=None, capped: bool = True):
        from dynconv.analysis.weight_ablation import select_layers

        usable, skipped = select_layers(self.layers, settings["layers"], kernel_size,
                                        settings["max_layers"] if capped else None)
        if not usable:
            kind = "3x3 convolution" if kernel_size else "convolution"
            reasons = "; ".join(f"{layer.name}: {layer.reason}" for layer in skipped[:3]) or "none found"
            raise MissingInput(f"{figure_id}: a classification checkpoint with a {kind} holding a plain weight "
                               f"(python train.py backbone=resnet50 op=static); {self.ref.label} "
                               f"({self.ref.checkpoint}) has none ({reasons})")
        return usable, skipped

    def header(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {"checkpoint": str(self.ref.checkpoint), "label": self.ref.label, "backbone": self.ref.backbone,
                "op": self.ref.op, "images": self.images, "max_val_samples": self.max_val_samples,
                "image_choice": "the first `images` of the validation loader (a random subset over all classes "
                                "when data.max_val_samples is set; ImageFolder order is by class otherwise)",
                "metric": settings["metric"],
                "baseline": {"top1": self.baseline.top1, "loss": self.baseline.loss},
                "weights": "as at inference: weight reparameterisations (LWE, MWE, WS, WN, SN) folded into plain "
                           "weights before ablating; dynamic operators' static kernel `weight`"}


def _skipped(skipped) -> list[dict[str, str]]:
    return [{"layer": layer.name, "reason": layer.reason} for layer in skipped]


def _metric_label(metric: str) -> str:
    return "D: top-1 accuracy lost (points)" if metric == "top1" else "D: mean cross-entropy gained"


@figure("we_fig1", "we", "Decrease in performance D vs the magnitude percentile of a zeroed weight (Fig. 1a)",
        "a classification checkpoint (op=static first; the paper: a pretrained ResNet50) and its validation split; "
        "ablation.images / metric / percentiles / bins / layers / max_layers")
def we_fig1(ctx: FigureContext) -> dict[str, Any]:
    from dynconv.analysis.weight_ablation import bin_curves, position_curve
    from dynconv.figures.output import new_figure

    settings = _ablation_settings(ctx)
    setup = AblationSetup(ctx, settings, "we_fig1")
    all_layers, skipped = setup.select(settings, "we_fig1", capped=False)
    positions = position_curve(setup.scorer, all_layers, settings["percentiles"], setup.baseline)
    per_layer: list[dict[str, Any]] = []
    binned_layers = []
    if settings["bins"]:
        binned_layers, _ = setup.select(settings, "we_fig1")
        per_layer = bin_curves(setup.scorer, binned_layers, settings["bins"], setup.baseline)
    key = f"drop_{settings['metric']}"

    fig, axes = new_figure(ncols=2 if per_layer else 1, size=(5.0, 3.8))
    ax = axes[0, 0]
    ax.plot([row["percentile"] for row in positions], [row[key] for row in positions], ".-", color="#d62728",
            markersize=3)
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel("b: magnitude percentile position of the zeroed weight (ascending |w|)", fontsize=8)
    ax.set_ylabel(_metric_label(settings["metric"]), fontsize=8)
    ax.set_title(f"(a) the b-th percentile weight of each of {len(all_layers)} conv layers zeroed at once",
                 fontsize=8)
    ax.tick_params(labelsize=7)
    if per_layer:
        ax = axes[0, 1]
        bins = settings["bins"]
        centres = [100.0 * (index + 0.5) / bins for index in range(bins)]
        colours = _depth_colours(len(binned_layers))
        curves = []
        for depth, layer in enumerate(binned_layers):
            values = {row["bin"]: row[key] for row in per_layer if row["depth"] == depth}
            curve = [values.get(index + 1, math.nan) for index in range(bins)]
            curves.append(curve)
            ax.plot(centres, curve, color=colours[depth], linewidth=0.9, alpha=0.8,
                    label=layer.name if len(binned_layers) <= 8 or depth in (0, len(binned_layers) - 1) else None)
        ax.plot(centres, np.nanmean(np.asarray(curves, dtype=np.float64), axis=0), "k-", linewidth=2.2,
                label="mean over layers")
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_xlabel(f"magnitude percentile of the zeroed bin ({bins} bins per layer)", fontsize=8)
        ax.set_ylabel(_metric_label(settings["metric"]), fontsize=8)
        ax.set_title("(b) one layer's bin zeroed, the others intact (not in the paper)", fontsize=8)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"WE Fig. 1a: {setup.ref.label}, top-1 {setup.baseline.top1:.2f}% on {setup.images} validation "
                 "images", fontsize=9)
    fig.tight_layout()

    data = {"figure": "we_fig1", **setup.header(settings), "percentiles": settings["percentiles"],
            "protocol": "paper (Sec. 3.1): weights of each conv layer sorted by ascending |w|; for each b the b-th "
                        "percentile weight (nearest rank ceil(b/P n), ties in index order) of every layer zeroed at "
                        "once, D recorded; restored before the next b",
            "layers": [{"layer": layer.name, "shape": list(layer.shape)} for layer in all_layers],
            "skipped": _skipped(skipped), "position_curve": positions,
            "bins": settings["bins"], "bin_layers": [layer.name for layer in binned_layers],
            "bin_protocol": "not in the paper: every weight of one equal-count |w| bin of one layer zeroed, the other "
                            "layers intact" if per_layer else None,
            "bin_curves": per_layer, "evaluations": setup.scorer.evaluations}
    rows = [{"panel": "a", **row} for row in positions] + [{"panel": "b", **row} for row in per_layer]
    ctx.save("we_fig1", fig, data=data, rows=rows)
    return {"checkpoint": str(setup.ref.checkpoint), "layers": len(all_layers), "skipped": len(skipped),
            "images": setup.images, "baseline_top1": setup.baseline.top1,
            "max_drop_top1": max(row["drop_top1"] for row in positions),
            "drop_top1_at_max_percentile": positions[-1]["drop_top1"], "evaluations": setup.scorer.evaluations}


def _depth_colours(count: int, name: str = "viridis") -> list:
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return [cmap(0.85 * index / max(count - 1, 1)) for index in range(count)]  # 0.85: no pale yellow end


@figure("we_fig2", "we", "Importance maps of sampled 3x3 kernels per 3x3 layer (Fig. 2)",
        "a classification checkpoint (op=static first; the paper: a pretrained ResNet50, its 16 3x3 layers) and its "
        "validation split; ablation.images / metric / channels / layers / max_layers")
def we_fig2(ctx: FigureContext) -> dict[str, Any]:
    from dynconv.analysis.weight_ablation import kernel_maps
    from dynconv.figures.output import new_figure

    settings = _ablation_settings(ctx)
    setup = AblationSetup(ctx, settings, "we_fig2")
    layers, skipped = setup.select(settings, "we_fig2", kernel_size=(3, 3))
    rows = kernel_maps(setup.scorer, layers, settings["channels"], setup.baseline)
    key = f"drop_{settings['metric']}"
    maps = []
    for depth, layer in enumerate(layers):
        mine = [row for row in rows if row["depth"] == depth]
        height, width = max(row["row"] for row in mine) + 1, max(row["column"] for row in mine) + 1
        grids = {name: np.full((height, width), np.nan) for name in ("drop_top1", "drop_loss")}
        for row in mine:
            for name, grid in grids.items():
                grid[row["row"], row["column"]] = row[name]
        maps.append({"layer": layer.name, "shape": list(layer.shape),
                     "out_channels": sorted({row["out_channel"] for row in mine}),
                     "in_channels": sorted({row["in_channel"] for row in mine}),
                     **{name: grid.tolist() for name, grid in grids.items()},
                     "spread_top1": float(np.nanmax(grids["drop_top1"]) - np.nanmin(grids["drop_top1"])),
                     "spread_loss": float(np.nanmax(grids["drop_loss"]) - np.nanmin(grids["drop_loss"]))})

    columns = min(len(maps), 4)
    fig, axes = new_figure(ncols=columns, nrows=-(-len(maps) // columns), size=(2.4, 2.4), layout="constrained")
    limit = max((abs(value) for entry in maps for line in entry[key] for value in line if not math.isnan(value)),
                default=0.0) or 1.0
    image = None
    for index, (ax, entry) in enumerate(zip(axes.flat, maps)):
        grid = np.asarray(entry[key])
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)  # one scale: maps compare across depth
        ax.set_xticks(range(len(entry["in_channels"])), [str(c) for c in entry["in_channels"]], fontsize=5)
        ax.set_yticks(range(len(entry["out_channels"])), [str(c) for c in entry["out_channels"]], fontsize=5)
        if index + columns >= len(maps):  # the lowest map of its column
            ax.set_xlabel("input channel I_i", fontsize=6)
        if index % columns == 0:
            ax.set_ylabel("output channel O_j", fontsize=6)
        ax.set_title(f"{_panel_letter(index)} {entry['layer']}", fontsize=6)
        if grid.size <= 36:
            for (y, x), value in np.ndenumerate(grid):
                ax.text(x, y, f"{value:.2g}", ha="center", va="center", fontsize=5)
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label=_metric_label(settings["metric"]))
    fig.suptitle(f"WE Fig. 2: D per zeroed 3x3 kernel, {setup.ref.label}, top-1 {setup.baseline.top1:.2f}% on "
                 f"{setup.images} images", fontsize=9)

    data = {"figure": "we_fig2", **setup.header(settings), "channels": settings["channels"],
            "protocol": "paper (Sec. 3.1): every 3x3 conv layer (at most ablation.max_layers, evenly spaced); in each, "
                        "N1 output and N2 input channels sampled equidistantly (rounded linspace(0, C-1, N), the "
                        "first and last included); each 3x3 kernel W[O_j, I_i] zeroed alone, D recorded, restored",
            "skipped": _skipped(skipped), "maps": maps, "evaluations": setup.scorer.evaluations}
    ctx.save("we_fig2", fig, data=data, rows=rows)
    return {"checkpoint": str(setup.ref.checkpoint), "layers": len(maps), "skipped": len(skipped),
            "images": setup.images, "baseline_top1": setup.baseline.top1,
            "max_drop_top1": max(row["drop_top1"] for row in rows),
            "spread_top1_first_last": [maps[0]["spread_top1"], maps[-1]["spread_top1"]],
            "evaluations": setup.scorer.evaluations}


# --------------------------------------------------------------------------------------------- f_A (MWE)


def magnitude_curves(eps_values: Sequence[float], points: int = 401) -> list[dict[str, float]]:
    """f_A(w) (Eq. 2) and its gradient gain dw_MWE/dw = M_A^2 / (M_A^2 - w^2) (Eq. 3) over w in [-M, M] with
    M = max|W| = 1, from `dynconv.ops.we.magnitude.magnitude_excitation` (the gain by autograd through it)."""
    from dynconv.ops.we.magnitude import magnitude_excitation

    rows = []
    for eps in eps_values:
        w = torch.linspace(-1.0, 1.0, points, dtype=torch.float64, requires_grad=True)
        value = magnitude_excitation(w, float(eps))
        (gain,) = torch.autograd.grad(value.sum(), w)
        for x, y, g in zip(w.detach().tolist(), value.detach().tolist(), gain.tolist()):
            rows.append({"eps": float(eps), "w": x, "f_A": y, "gain": g})
    return rows


@figure("we_fig3b", "we", "The MWE function f_A(w) for several eps_A (Fig. 3b, Eq. 2)",
        "nothing: analytic (we_magnitude.eps)")
def we_fig3b(ctx: FigureContext) -> dict[str, Any]:
    from dynconv.figures.output import new_figure

    eps_values = [float(value) for value in ctx.cfg.we_magnitude.eps]
    if not eps_values or min(eps_values) <= 0:
        raise ValueError(f"we_magnitude.eps={eps_values} is invalid; allowed values: a list of numbers > 0")
    rows = magnitude_curves(eps_values)
    fig, axes = new_figure(ncols=2, size=(4.4, 3.8))
    left, right = axes[0, 0], axes[0, 1]
    left.plot([-1, 1], [-1, 1], color="#1f77b4", linewidth=1.2, label="identity")
    colours = _depth_colours(len(eps_values), "plasma")
    for colour, eps in zip(colours, eps_values):
        mine = [row for row in rows if row["eps"] == eps]
        left.plot([row["w"] for row in mine], [row["f_A"] for row in mine], color=colour, label=f"eps_A = {eps:g}")
        right.plot([row["w"] for row in mine], [row["gain"] for row in mine], color=colour, label=f"eps_A = {eps:g}")
    left.set_xlabel("w / M  (M = max |w| of the layer)", fontsize=8)
    left.set_ylabel("f_A(w) / M", fontsize=8)
    left.set_title("(b) f_A(w) = M_A atanh(w / M_A), M_A = (1 + eps_A) M", fontsize=8)
    right.set_xlabel("w / M", fontsize=8)
    right.set_ylabel("gradient gain M_A^2 / (M_A^2 - w^2)", fontsize=8)
    right.set_title("Eq. 3: the gain on the backpropagated gradient", fontsize=8)
    for ax in (left, right):
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle("WE Fig. 3b: magnitude-based weight excitation", fontsize=9)
    fig.tight_layout()
    peaks = {f"{eps:g}": (1 + eps) ** 2 / ((1 + eps) ** 2 - 1) for eps in eps_values}
    data = {"figure": "we_fig3b", "eps": eps_values, "M": 1.0,
            "source": "dynconv.ops.we.magnitude.magnitude_excitation on w = linspace(-1, 1) (so max|w| = M = 1); gain: "
                      "its autograd derivative (M_A held constant, as Eq. 3)",
            "max_gain": peaks, "rows": len(rows)}
    ctx.save("we_fig3b", fig, data=data, rows=rows)
    return {"eps": eps_values, "max_gain": {key: round(value, 3) for key, value in peaks.items()}}


# ------------------------------------------------------------------------------------- training curves


def read_scalars(folder: Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """The scalars `tags` of a TensorBoard log folder as sorted (step, value) lists; a step written twice (a resumed
    run repeating an epoch) keeps its last value. Missing tags are left out."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every event
    accumulator.Reload()
    present = set(accumulator.Tags().get(SCALARS, []))
    curves = {}
    for tag in tags:
        if tag in present:
            by_step = {}
            for event in accumulator.Scalars(tag):
                by_step[int(event.step)] = float(event.value)
            curves[tag] = sorted(by_step.items())
    return curves


def _get(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def describe_run(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What a run is, from its config: backbone, op, attention, normalisation, optimizer, scheduler, and its label
    (backbone [GN] + op [+ attn])."""
    info = {"run_dir": str(run_dir), "backbone": _get(config, "backbone.name") or "?",
            "op": _get(config, "op.name") or "static", "attn": _get(config, "attn.name") or "none",
            "norm": _get(config, "backbone.norm_layer") or "batchnorm", "opt": _get(config, "recipe.opt"),
            "sched": _get(config, "recipe.sched"), "cycle_limit": _get(config, "recipe.cycle_limit"),
            "epochs": _get(config, "recipe.epochs"), "task": _get(config, "task.name") or "classification"}
    label = info["backbone"] + (" (GN)" if info["norm"] == "groupnorm" else "") + f" + {info['op']}"
    info["label"] = label + (f" + {info['attn']}" if info["attn"] != "none" else "")
    return info


def collect_curves(ctx: FigureContext, metric: str, need: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(runs under `runs=` with val/<metric> in their TensorBoard logs, each with its curves; the runs left out and
    why). Raises MissingInput(need) without `runs=`."""
    if not ctx.cfg.runs:
        raise MissingInput(f"{need}: pass runs=<folder of train.py / reproduce.py runs>, each with its tensorboard/ "
                           "logs")
    tag = f"val/{metric}"
    runs, left_out = [], []
    for run_dir in ctx.run_dirs():
        info = describe_run(run_dir, _read_config(run_dir))
        folder = run_dir / "tensorboard"
        if info["task"] != "classification":
            left_out.append({"run_dir": str(run_dir), "reason": f"task={info['task']}, not classification"})
            continue
        if not folder.is_dir():
            left_out.append({"run_dir": str(run_dir), "reason": "no tensorboard/ folder"})
            continue
        curves = read_scalars(folder, (tag, "train/epoch_loss"))
        if tag not in curves:
            left_out.append({"run_dir": str(run_dir), "reason": f"its TensorBoard logs hold no {tag}"})
            continue
        runs.append({**info, "val": curves[tag], "train_epoch_loss": curves.get("train/epoch_loss", []),
                     "last_val": curves[tag][-1][1],
                     "best_val": (min if metric == "loss" else max)(value for _, value in curves[tag])})
    return runs, left_out


def _unique_labels(groups: dict[str, dict[str, Any]]) -> None:
    """Two runs of one setting in one panel (seeds, recipes) are told apart by their folder's name."""
    for group in groups.values():
        labels = [run["label"] for run in group["runs"]]
        for run in group["runs"]:
            if labels.count(run["label"]) > 1:
                run["label"] += f" [{Path(run['run_dir']).name}]"


def _draw_group(axes_row, runs: list[dict[str, Any]], metric: str, title: str, paper=None,
                by_norm: bool = False) -> None:
    """Validation metric and training loss of `runs`, one line each. WE operators solid, the others dashed; with
    `by_norm` (BN vs GN) one colour per operator + attention, GroupNorm solid and BatchNorm dashed."""
    from matplotlib.ticker import MaxNLocator

    val, loss = axes_row[0], axes_row[1]
    if by_norm:
        settings = list(dict.fromkeys((run["op"], run["attn"]) for run in runs))
        colours = [matplotlib_colour(settings.index((run["op"], run["attn"]))) for run in runs]
    else:
        colours = [matplotlib_colour(index) for index in range(len(runs))]
    for colour, run in zip(colours, runs):
        solid = run["norm"] == "groupnorm" if by_norm else run["op"] in WE_OPS
        style = "-" if solid else "--"
        val.plot([step for step, _ in run["val"]], [value for _, value in run["val"]], style, color=colour,
                 label=run["label"], linewidth=1.3)
        if run["train_epoch_loss"]:
            loss.plot([step for step, _ in run["train_epoch_loss"]], [value for _, value in run["train_epoch_loss"]],
                      style, color=colour, label=run["label"], linewidth=1.3)
    for point in paper or []:
        val.plot([point["epoch"]], [point["top1"]], "*", color="black", markersize=8)
        val.annotate(f"paper {point['top1']}", (point["epoch"], point["top1"]), fontsize=6, xytext=(3, 0),
                     textcoords="offset points")
    val.set_title(f"{title}: validation {metric}", fontsize=8)
    loss.set_title(f"{title}: training loss per epoch", fontsize=8)
    val.set_ylabel(f"val/{metric}" + (" (%)" if metric.startswith("top") else ""), fontsize=8)
    loss.set_ylabel("train/epoch_loss", fontsize=8)
    for ax in (val, loss):
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)


def matplotlib_colour(index: int):
    import matplotlib

    return matplotlib.colormaps["tab10"](index % 10)


def _curve_rows(groups: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for key, group in groups.items():
        for run in group["runs"]:
            losses = dict(run["train_epoch_loss"])
            values = dict(run["val"])
            for epoch in sorted(set(values) | set(losses)):
                rows.append({"panel": key, "label": run["label"], "run_dir": run["run_dir"], "epoch": epoch,
                             "val": values.get(epoch), "train_epoch_loss": losses.get(epoch)})
    return rows


def _curves_figure(ctx: FigureContext, figure_id: str, title: str, groups: dict[str, dict[str, Any]], metric: str,
                   extra: dict[str, Any]) -> None:
    from dynconv.figures.output import new_figure

    _unique_labels(groups)
    fig, axes = new_figure(ncols=2, nrows=len(groups), size=(4.8, 3.4))
    for axes_row, (key, group) in zip(axes, groups.items()):
        _draw_group(axes_row, group["runs"], metric, f"({key}) {group['title']}", group.get("paper"),
                    by_norm=group.get("by_norm", False))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    data = {"figure": figure_id, "metric": metric, "note": TRAINING_ACCURACY_NOTE,
            "x": "epoch (the TensorBoard step of val/* and train/epoch_loss)", "panels": groups, **extra}
    ctx.save(figure_id, fig, data=data, rows=_curve_rows(groups))


def _curves_metric(ctx: FigureContext) -> str:
    metric = str(ctx.cfg.curves.metric)
    if metric not in ("top1", "top5", "loss"):
        raise ValueError(f"curves.metric={metric!r} is invalid; allowed values: top1, top5, loss")
    return metric


def _belongs_to_fig5(run: dict[str, Any]) -> str | None:
    if run["norm"] == "groupnorm":
        return "backbone.norm_layer=groupnorm (Fig. 5a)"
    if run["opt"] == "adamw":
        return "recipe.opt=adamw (Fig. 5b)"
    return None


@figure("we_fig4", "we", "Training and validation curves: LWE vs baselines, with SE/BAM/CBAM, vs WS/WN/SN (Fig. 4)",
        "runs= (train.py / reproduce.py runs with TensorBoard logs: val/<curves.metric> and train/epoch_loss per "
        "epoch); curves.metric")
def we_fig4(ctx: FigureContext) -> dict[str, Any]:
    metric = _curves_metric(ctx)
    need = (f"we_fig4: classification runs with TensorBoard logs (val/{metric} per epoch) under runs= (the paper: "
            "ResNet50 etc. with op=static / op=lwe, attn=se/bam/cbam, op=weight_std/weight_norm/spectral_norm)")
    runs, left_out = collect_curves(ctx, metric, need)
    kept = []
    for run in runs:
        reason = _belongs_to_fig5(run)
        if reason:
            left_out.append({"run_dir": run["run_dir"], "reason": f"{reason}: drawn by we_fig5"})
        else:
            kept.append(run)
    if not kept:
        found = "; ".join(f"{item['run_dir']}: {item['reason']}" for item in left_out[:4]) or "no runs found"
        raise MissingInput(f"{need} ({found})")
    plain = [run for run in kept if run["attn"] == "none" and run["op"] not in REPARAM_OPS]
    attention = [run for run in kept if run["attn"] != "none"]
    reparam = [run for run in kept if run["op"] in REPARAM_OPS]
    if reparam:
        backbones = {run["backbone"] for run in reparam}
        reparam = [run for run in plain if run["backbone"] in backbones] + reparam
    candidates = {"a": ("LWE vs baselines", plain), "b": ("with feature attention (SE / BAM / CBAM)", attention),
                  "c": ("vs weight-normalising reparameterisations (WS / WN / SN)", reparam)}
    groups = {key: {"title": title, "runs": members} for key, (title, members) in candidates.items() if members}
    _curves_figure(ctx, "we_fig4", "WE Fig. 4: training and validation curves", groups, metric,
                   {"left_out": left_out})
    return {"metric": metric, "panels": {key: [run["label"] for run in group["runs"]] for key, group in groups.items()},
            "last_val": {run["label"]: run["last_val"] for run in kept}, "left_out": len(left_out)}


@figure("we_fig5", "we", "Curves with BatchNorm vs GroupNorm, and with AdamW + cosine annealing (Fig. 5)",
        "runs= with TensorBoard logs: (a) backbone.norm_layer=groupnorm runs and BatchNorm twins of the same "
        "backbone, (b) recipe.opt=adamw recipe.sched=cosine runs (recipe=we_adamw_sgdr); curves.metric")
def we_fig5(ctx: FigureContext) -> dict[str, Any]:
    metric = _curves_metric(ctx)
    need_a = ("we_fig5 (a): runs trained with backbone.norm_layer=groupnorm and BatchNorm twins "
              "(backbone.norm_layer=batchnorm, the same backbone and recipe.opt) under runs=, with TensorBoard logs "
              "(the paper: python train.py backbone=resnet50 backbone.norm_layer=groupnorm op=static, and op=lwe; "
              "the same with batchnorm)")
    need_b = ("we_fig5 (b): runs trained with recipe.opt=adamw recipe.sched=cosine under runs=, with TensorBoard "
              "logs (the paper: recipe=we_adamw_sgdr backbone=resnet50 with op=static, attn=se, op=lwe)")
    runs, left_out = collect_curves(ctx, metric, f"{need_a}; {need_b}")
    missing = {}
    groups = {}
    gn = [run for run in runs if run["norm"] == "groupnorm"]
    twins = [run for run in runs if run["norm"] != "groupnorm"
             and any(run["backbone"] == other["backbone"] and run["opt"] == other["opt"] for other in gn)]
    if gn and twins:
        groups["a"] = {"title": "BatchNorm (dashed) vs GroupNorm (solid)", "runs": twins + gn, "by_norm": True}
    else:
        missing["a"] = need_a + ("" if not gn else f" (no BatchNorm twin of {', '.join(r['label'] for r in gn)})")
    adamw = [run for run in runs if run["opt"] == "adamw" and run["sched"] == "cosine"]
    if adamw:
        paper = []
        if metric == "top1":
            for run in adamw:
                value = FIG5B_PAPER_TOP1.get((run["op"], run["attn"]))
                if value is not None and run["backbone"] == "resnet50" and run["norm"] != "groupnorm":
                    paper.append({"label": run["label"], "epoch": run["val"][-1][0], "top1": value})
        groups["b"] = {"title": "AdamW + cosine annealing", "runs": adamw, "paper": paper,
                       "restarts": {run["label"]: run["cycle_limit"] for run in adamw}}
    else:
        missing["b"] = need_b
    if not groups:
        raise MissingInput(f"{missing['a']}; {missing['b']}")
    _curves_figure(ctx, "we_fig5", "WE Fig. 5: (a) BN vs GN, (b) AdamW + cosine annealing", groups, metric,
                   {"missing": missing, "left_out": left_out,
                    "paper_last_epoch_top1": {"resnet50": 70.9, "resnet50 + se": 71.2, "resnet50 + lwe": 72.0}})
    return {"metric": metric, "panels": {key: [run["label"] for run in group["runs"]] for key, group in groups.items()},
            "missing": missing}
