"""KernelWarehouse Figures 3 and 7-10 (Li & Yao, ICML 2024, Sec. 4.3 and Appendix): heatmaps of the mean learnt
attention alpha_ij per warehouse.

One heatmap per warehouse: rows are every linear mixture of every layer that shares it (layers in forward order,
separated by lines), columns its n cells; the value is alpha_ij averaged over the validation split
(`dynconv.analysis.kw_attention.AttentionRecorder`, the same statistics `scripts/kw_attention.py` exports).
Figure 3 is one trained KW (1x) ResNet18; Figures 7-10 repeat it for the ablations of Tables 8 and 13 (attention
functions, initialisation strategies at 1x, 4x and 1/2x), one row of heatmaps per variant, found among the runs as
the table rows they trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dynconv.figures.context import FigureContext, RunRef, matches_row
from dynconv.figures.registry import MissingInput, figure

# Figures 7-10: the paper-table rows each one compares, in the paper's panel order.
VARIANT_FIGURES = {
    "kw_fig7": ("kw_t8", ("kw_1x_caf", "kw_1x_softmax", "kw_1x_sigmoid", "kw_1x_relu_norm"),
                "attention functions (Table 8): (a) z/sum|z| (CAF), (b) softmax, (c) sigmoid, (d) max(z,0)/sum|z|"),
    "kw_fig8": ("kw_t13", ("kw1_one_to_one", "kw1_all_to_one", "kw1_no_init"),
                "KW (1x) initialisation (Table 13): one-to-one, all-to-one, none"),
    "kw_fig9": ("kw_t13", ("kw4_one_to_one", "kw4_four_to_one"),
                "KW (4x) initialisation (Table 13): one-to-one, four-to-one"),
    "kw_fig10": ("kw_t13", ("kw1_2_one_to_one", "kw1_2_one_to_two"),
                 "KW (1/2x) initialisation (Table 13): one-to-one, one-to-two"),
}


def attention_stats(ctx: FigureContext, ref: RunRef) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mean alpha per warehouse, {"images", "top1"}) of `ref`'s model over `kw.images` validation images."""
    from dynconv.analysis.kw_attention import AttentionRecorder, kw_layers

    run = ctx.load(ref)
    if not kw_layers(run.model):
        raise MissingInput(f"{ref.checkpoint} (op=kw) has no KernelWarehouse layers: every layer stayed static")
    limit = ctx.cfg.kw.images
    correct = seen = 0
    with AttentionRecorder(run.model) as recorder, torch.no_grad():
        for images, targets in ctx.batches(run, None if limit is None else int(limit)):
            logits = run.model(images)
            correct += int((logits.argmax(1) == targets).sum())
            seen += images.shape[0]
    return recorder.mean_by_warehouse(), {"images": seen, "top1": 100.0 * correct / max(seen, 1)}


def stats_from_export(path: Path) -> dict[str, Any]:
    """The statistics `scripts/kw_attention.py` wrote (`<out>.pt`), e.g. over ImageNet's 50,000 images on a cluster."""
    if not path.is_file():
        raise FileNotFoundError(f"kw.attention={path}: no such file (scripts/kw_attention.py writes <out>.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return payload["warehouses"]
    except Exception as error:
        raise ValueError(f"kw.attention={path}: not a kw_attention export ({type(error).__name__}: {error})") from None


def draw_row(axes, stats: dict[str, Any], title_prefix: str = "") -> None:
    """One heatmap per warehouse on `axes` (a sequence at least as long as the warehouses)."""
    from dynconv.analysis.kw_attention import diagonal_fraction

    for ax, (key, entry) in zip(axes, stats.items()):
        alpha = entry["alpha"].numpy()
        image = ax.imshow(alpha, aspect="auto", cmap="viridis", interpolation="nearest")
        for layer in entry["layers"][1:]:
            ax.axhline(layer["rows"][0] - 0.5, color="white", linewidth=0.6)
        fraction = diagonal_fraction(entry)
        shown = "" if fraction is None else f", diagonal {100 * fraction:.0f}%"
        ax.set_title(f"{title_prefix}{key} ({alpha.shape[0]} x {alpha.shape[1]}{shown})", fontsize=8)
        ax.set_xlabel("cell j", fontsize=7)
        ax.set_ylabel("linear mixture i (layers in forward order)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    for ax in list(axes)[len(stats):]:
        ax.axis("off")


def heatmap_figure(stats: dict[str, Any], title: str | None = None):
    """A matplotlib figure of Figure 3: one heatmap of mean alpha per warehouse (also logged to TensorBoard)."""
    from dynconv.figures.output import new_figure

    fig, axes = new_figure(ncols=max(len(stats), 1), size=(3.6, 4.2))
    draw_row(axes[0], stats)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def stats_rows(stats: dict[str, Any], variant: str | None = None) -> list[dict[str, Any]]:
    """Long-format CSV rows: one per (warehouse, mixture, cell) with the layer the mixture belongs to."""
    rows = []
    for key, entry in stats.items():
        alpha = entry["alpha"]
        for layer in entry["layers"]:
            first, end = layer["rows"]
            for row in range(first, end):
                for cell in range(alpha.shape[1]):
                    record = {"warehouse": key, "row": row, "layer": layer["name"], "mixture": row - first,
                              "cell": cell, "alpha": float(alpha[row, cell])}
                    rows.append(record if variant is None else {"variant": variant, **record})
    return rows


def stats_json(stats: dict[str, Any]) -> dict[str, Any]:
    from dynconv.analysis.kw_attention import diagonal_fraction

    return {key: {"alpha": entry["alpha"].tolist(), "diagonal_fraction": diagonal_fraction(entry),
                  "layers": [{k: layer[k] for k in ("name", "rows", "own_cells", "own_targets", "samples")}
                             for layer in entry["layers"]]}
            for key, entry in stats.items()}


@figure("kw_fig3", "kw", "Mean learnt attention alpha_ij per warehouse (KW 1x ResNet18)",
        "a checkpoint trained with op=kw (or kw.attention=<scripts/kw_attention.py export>.pt); the validation split")
def kw_fig3(ctx: FigureContext) -> dict[str, Any]:
    export = ctx.cfg.kw.get("attention")
    if export:
        stats, source, extra = stats_from_export(Path(str(export))), str(export), {}
        shown = Path(str(export)).name
    else:
        ref = ctx.find(("kw",), need="a checkpoint trained with op=kw (python train.py op=kw)",
                       prefer=("kw",))
        stats, extra = attention_stats(ctx, ref)
        source = str(ref.checkpoint)
        shown = f"{ref.label}, {extra['images']} images, top-1 {extra['top1']:.1f}%"
    fig = heatmap_figure(stats, f"KernelWarehouse: mean alpha per warehouse ({shown})")
    data = {"figure": "kw_fig3", "source": source, **extra, "warehouses": stats_json(stats)}
    ctx.save("kw_fig3", fig, data=data, rows=stats_rows(stats))
    return {"source": source, **extra,
            "diagonal_fraction": {key: value["diagonal_fraction"] for key, value in data["warehouses"].items()}}


def _variant_figure(figure_id: str):
    table_id, row_ids, description = VARIANT_FIGURES[figure_id]

    def make(ctx: FigureContext) -> dict[str, Any]:
        found, missing = {}, []
        for row_id in row_ids:
            refs = [ref for ref in ctx.candidates() if ref.op == "kw" and matches_row(ref, table_id, row_id)]
            if refs:
                found[row_id] = refs[0]
            else:
                missing.append(row_id)
        if not found:
            raise MissingInput(f"checkpoints of {table_id} rows {', '.join(row_ids)} (python scripts/reproduce.py "
                               f"launch table={table_id} runs=<folder>, then runs=<folder>)")
        all_stats = {row_id: attention_stats(ctx, ref) for row_id, ref in found.items()}
        from dynconv.figures.output import new_figure

        columns = max(len(stats) for stats, _ in all_stats.values())
        fig, axes = new_figure(ncols=columns, nrows=len(all_stats), size=(3.6, 4.0))
        for axes_row, (row_id, (stats, _)) in zip(axes, all_stats.items()):
            draw_row(axes_row, stats, title_prefix=f"{row_id}: ")
        fig.suptitle(f"KernelWarehouse, {description}", fontsize=9)
        fig.tight_layout()
        rows = [record for row_id, (stats, _) in all_stats.items() for record in stats_rows(stats, row_id)]
        data = {"figure": figure_id, "table": table_id, "missing_variants": missing,
                "variants": {row_id: {"checkpoint": str(found[row_id].checkpoint), **extra,
                                      "warehouses": stats_json(stats)}
                             for row_id, (stats, extra) in all_stats.items()}}
        ctx.save(figure_id, fig, data=data, rows=rows)
        return {"variants": list(found), "missing_variants": missing}

    return make


for _figure_id, (_table, _rows, _description) in VARIANT_FIGURES.items():
    figure(_figure_id, "kw", f"Figure 3 for the {_description}",
           f"checkpoints of the {_table} rows {', '.join(_rows)} (runs= or checkpoint=)")(_variant_figure(_figure_id))

