"""WeightNet (Ma et al., ECCV 2020) Figures 5 and 6: the kernels a dynamic layer generates per image (Sec. 5).

- `wn_fig5` (Fig. 5, "weight similarity among distinct samples"): the kernels of one layer (the paper: the last
  convolution of Stage 4 of ShuffleNetV2 (2x) + WeightNet) for 50 validation images of each of 20 randomly chosen
  classes, flattened, embedded in 2-D by t-SNE and coloured by class.
- `wn_fig6` (Fig. 6, "channel similarity"): the cosine similarity between that layer's filters (one per output
  channel, flattened), pair by pair: (a) the static network's kernel, (b-f) the dynamic network's kernels of 5
  validation images of distinct classes (the paper: ShuffleNetV2 (0.5x), 96 filters). The paper reads lower
  similarity (more diverse filters) off the dynamic matrices; the data here reports the mean |similarity| off
  the diagonal of every matrix and which is lower, whatever it is.

Any per-sample operator's checkpoint is accepted (op=weightnet first): the kernels come from
`dynconv.analysis.kernel_export`, which records the kernel each dynamic layer applies, for every such operator.
The layer (`kernels.layer`, null): the last layer that applies a per-sample kernel in a forward pass, which for
the paper's ShuffleNetV2 is the last convolution of Stage 4 (`stage4.3.branch2.5`) and for a ResNet layer4's last.

Images: `kernels.classes` classes drawn at random (seeded by `seed`) among those of the validation split, and
`kernels.per_class` images drawn from each (all of a class when it has fewer; the JSON says how many each got).
Only the drawn images are read and run. Kernels longer than `kernels.max_dims` are hashed to that many
dimensions before t-SNE (signed feature hashing: squared distances are kept in expectation, within about
sqrt(2 / max_dims) relative spread), which bounds the memory of 1,000 kernels of a wide layer.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from dynconv.figures.context import PER_SAMPLE_OPS, FigureContext, LoadedRun, RunRef
from dynconv.figures.registry import MissingInput, figure

PAPER_BACKBONES = {"wn_fig5": "shufflenetv2_wn_x2_0", "wn_fig6": "shufflenetv2_wn_x0_5"}


# ---------------------------------------------------------------------------------------------- inputs


def _given(ctx: FigureContext) -> str:
    return ", ".join(f"{ref.label} ({ref.checkpoint})" for ref in ctx.candidates()) or "none"


def _dynamic_refs(ctx: FigureContext, figure_id: str) -> list[RunRef]:
    """Classification checkpoints of a per-sample operator: op=weightnet first, the paper's backbone first."""
    refs = [ref for ref in ctx.candidates() if ref.task == "classification" and ref.op in PER_SAMPLE_OPS]
    if not refs:
        backbone = PAPER_BACKBONES[figure_id]
        raise MissingInput(f"a checkpoint trained with op=weightnet (or another per-sample op: "
                           f"{', '.join(PER_SAMPLE_OPS)}): python train.py op=weightnet (the paper's network: "
                           f"backbone={backbone}) (checkpoints given: {_given(ctx)})")
    return sorted(refs, key=lambda ref: (ref.smoke, ref.op != "weightnet", ref.backbone != PAPER_BACKBONES[figure_id]))


def _fig6_pair(ctx: FigureContext) -> tuple[RunRef, RunRef]:
    """(static, dynamic) checkpoints of one backbone."""
    dynamic = _dynamic_refs(ctx, "wn_fig6")
    for candidate in dynamic:
        try:
            return ctx.find(("static",), need="", backbone=candidate.backbone), candidate
        except MissingInput:
            continue
    first = dynamic[0]
    raise MissingInput(f"a checkpoint of backbone={first.backbone} trained with op=static, the static network whose "
                       f"filters are compared with {first.label} ({first.checkpoint}): python train.py "
                       f"backbone={first.backbone} op=static (checkpoints given: {_given(ctx)})")


def resolve_kernel_layer(run: LoadedRun, layer: str | None, example: torch.Tensor) -> str:
    """The module name (from the model's root) of `layer`: null = the last layer that applies a per-sample
    kernel in a forward pass of `example`; else a name from the model's root or inside the backbone."""
    from dynconv.analysis.kernel_export import dynamic_conv_layers

    with torch.no_grad():
        dynamic = dynamic_conv_layers(run.model, example[:1])
    if layer is None:
        if not dynamic:
            raise ValueError(f"{run.ref.label} applies no per-sample kernel: nothing to export")
        return dynamic[-1]
    names = {name for name, _ in run.model.named_modules()}
    for candidate in (layer, f"net.{layer}"):
        if candidate in names:
            return candidate
    raise ValueError(f"kernels.layer={layer!r} is not a module of {run.ref.label}; allowed values: null or one of "
                     f"its per-sample convolutions, e.g. {', '.join(dynamic[-3:]) or 'net.layer4.1.conv2'}")


# ---------------------------------------------------------------------------------------------- images


def split_targets(dataset: Dataset) -> list[int] | None:
    """The labels of a validation dataset in its index order, without reading images, when the dataset (or the
    one a Subset / wrapper of the same length holds) keeps them as `.targets`; else None."""
    if isinstance(dataset, Subset):
        inner = split_targets(dataset.dataset)
        return None if inner is None else [inner[index] for index in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(target) for target in targets]
    inner = getattr(dataset, "dataset", None)
    if isinstance(inner, Dataset) and len(inner) == len(dataset):
        return split_targets(inner)
    return None


def _plain_dataset(run: LoadedRun) -> Dataset:
    """The validation dataset indexed by position (the loader's SeededDataset takes (index, seed) keys)."""
    from dynconv.data.seeded import SeededDataset

    dataset = run.data.val_loader.dataset
    return dataset.dataset if isinstance(dataset, SeededDataset) else dataset


def pick_per_class(targets: list[int], classes: int, per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """(drawn classes, sorted; drawn image indices, by class): `classes` classes drawn among those present, then
    `per_class` of each class's images (all of them when it has fewer)."""
    rng = np.random.default_rng(seed)
    present = sorted(set(targets))
    chosen = sorted(int(c) for c in rng.choice(present, size=min(classes, len(present)), replace=False))
    by_class = {c: [index for index, target in enumerate(targets) if target == c] for c in chosen}
    picked = []
    for c in chosen:
        members = by_class[c]
        picked += sorted(int(i) for i in rng.choice(members, size=min(per_class, len(members)), replace=False))
    return chosen, picked


def pick_distinct(targets: list[int], count: int, seed: int) -> list[int]:
    """`count` image indices of distinct classes where the split has that many classes (round robin over the
    classes in a random order, one random image of each per round, otherwise)."""
    rng = np.random.default_rng(seed)
    present = [int(c) for c in rng.permutation(sorted(set(targets)))]
    pools = {c: [int(i) for i in rng.permutation([i for i, t in enumerate(targets) if t == c])] for c in present}
    picked: list[int] = []
    while len(picked) < min(count, len(targets)):
        for c in present:
            if pools[c] and len(picked) < count:
                picked.append(pools[c].pop())
    return picked


class _Picked(Dataset):
    """Chosen images of a dataset as (image, (target, index)); a dataset's corrupt-sample marker passes through."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        sample = self.dataset[index]
        if isinstance(sample, (tuple, list)):
            return sample[0], (int(sample[1]), index)
        return sample


def picked_batches(ctx: FigureContext, run: LoadedRun, indices: list[int]
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, targets, indices in the validation split) of the chosen images only, on the run's device."""
    from dynconv.data.collate import collate_skip_corrupt

    loader = run.data.val_loader
    picked = DataLoader(_Picked(_plain_dataset(run), indices), batch_size=loader.batch_size or 1, shuffle=False,
                        num_workers=loader.num_workers, collate_fn=collate_skip_corrupt)
    for images, labels, _skipped in picked:
        if images is None:
            continue
        targets, positions = labels
        yield images.to(run.device), targets.to(run.device), positions


def _targets(run: LoadedRun) -> list[int]:
    targets = split_targets(run.data.val_loader.dataset)
    if targets is None:  # a dataset without .targets: read each sample's label (decodes every image once)
        dataset = _plain_dataset(run)
        targets = [int(dataset[index][1]) for index in range(len(dataset))]
    return targets


# --------------------------------------------------------------------------------------------- kernels


class KernelSketch:
    """Flattens (B, ...) kernels to (B, D) and, when D > dims, hashes them to (B, dims): coordinate j is added to
    bucket h(j) with sign s(j) (signed feature hashing, Weinberger et al. 2009). Inner products, hence squared
    distances, are kept in expectation. h and s are drawn once per D from `seed`, so every batch agrees."""

    def __init__(self, dims: int | None, seed: int):
        self.dims = None if dims is None else int(dims)
        self.seed = seed
        self._hash: tuple[torch.Tensor, torch.Tensor] | None = None

    def hashes(self, size: int) -> bool:
        return self.dims is not None and size > self.dims

    def __call__(self, kernels: torch.Tensor) -> torch.Tensor:
        flat = kernels.reshape(kernels.shape[0], -1)
        if not self.hashes(flat.shape[1]):
            return flat
        if self._hash is None or self._hash[0].numel() != flat.shape[1]:
            generator = torch.Generator().manual_seed(self.seed)
            buckets = torch.randint(self.dims, (flat.shape[1],), generator=generator)
            signs = torch.randint(2, (flat.shape[1],), generator=generator).to(torch.float32) * 2 - 1
            self._hash = (buckets, signs)
        buckets, signs = (t.to(flat.device) for t in self._hash)
        out = flat.new_zeros(flat.shape[0], self.dims)
        return out.index_add_(1, buckets, flat * signs.to(flat.dtype))


def record_kernels(ctx: FigureContext, run: LoadedRun, indices: list[int], transform=None
                   ) -> tuple[str, torch.Tensor, list[int], list[int], tuple[int, ...]]:
    """(layer, kernels (N, ...) kept by `transform`, their classes, their split indices, one kernel's shape) of the
    chosen images, in the order read."""
    from dynconv.analysis.kernel_export import KernelRecorder

    batches = picked_batches(ctx, run, indices)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"none of the {len(indices)} chosen validation images of {run.ref.label} could be read")
    chosen = ctx.cfg.kernels.layer
    layer = resolve_kernel_layer(run, None if chosen is None else str(chosen), first[0])
    shape: list[tuple[int, ...]] = []

    def keep(kernels: torch.Tensor) -> torch.Tensor:
        shape.append(tuple(kernels.shape[1:]))
        return kernels if transform is None else transform(kernels)

    classes: list[int] = []
    positions: list[int] = []
    run.model.eval()
    with KernelRecorder(run.model, layer, transform=keep) as recorder, ctx.no_grad():
        for images, targets, where in [first, *batches]:
            run.model(images)
            classes += [int(t) for t in targets.tolist()]
            positions += [int(i) for i in where.tolist()]
    return layer, recorder.kernels(layer), classes, positions, shape[0]


# ----------------------------------------------------------------------------------------------- Fig. 5


def tsne_perplexity(requested: float, points: int) -> float:
    """The perplexity used: scikit-learn's t-SNE looks at 3 x perplexity neighbours and needs perplexity < points,
    so with few points it is lowered to (points - 1) / 3."""
    return float(min(float(requested), max((points - 1) / 3.0, 1.0)))


def embed_tsne(points: np.ndarray, perplexity: float, seed: int) -> tuple[np.ndarray, float]:
    """(N, 2) t-SNE embedding of `points` (N, D) (PCA initialisation, seeded) and its final KL divergence."""
    from sklearn.manifold import TSNE

    if points.shape[0] < 3:
        raise ValueError(f"t-SNE needs at least 3 images, got {points.shape[0]}")
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(points), float(tsne.kl_divergence_)


@figure("wn_fig5", "wn", "t-SNE of the per-sample kernels of one layer, coloured by class (Fig. 5)",
        "a classification checkpoint of a per-sample op (op=weightnet first; the paper: shufflenetv2_wn_x2_0 + "
        "WeightNet); its validation split; kernels.layer / classes / per_class / perplexity / max_dims")
def wn_fig5(ctx: FigureContext) -> dict[str, Any]:
    ref = _dynamic_refs(ctx, "wn_fig5")[0]
    run = ctx.load(ref)
    settings = ctx.cfg.kernels
    seed = int(ctx.cfg.seed)
    targets = _targets(run)
    classes, indices = pick_per_class(targets, int(settings.classes), int(settings.per_class), seed)
    sketch = KernelSketch(settings.get("max_dims"), seed)
    layer, kernels, labels, positions, shape = record_kernels(ctx, run, indices, sketch)
    points = kernels.to(torch.float64).numpy()
    perplexity = tsne_perplexity(float(settings.perplexity), points.shape[0])
    embedded, kl = embed_tsne(points, perplexity, seed)

    names = run.class_names
    counts = {names[c]: labels.count(c) for c in classes}
    notes = []
    if len(classes) < int(settings.classes):
        notes.append(f"the validation split has {len(classes)} classes, fewer than kernels.classes="
                     f"{int(settings.classes)}: all of them are shown")
    short = {name: count for name, count in counts.items() if count < int(settings.per_class)}
    if short:
        notes.append(f"{len(short)} classes have fewer than kernels.per_class={int(settings.per_class)} images: "
                     + ", ".join(f"{name} ({count})" for name, count in short.items()))
    rows = [{"x": float(x), "y": float(y), "class": int(c), "class_name": names[c], "image": int(i)}
            for (x, y), c, i in zip(embedded, labels, positions)]
    fig = _draw_fig5(embedded, labels, classes, names, f"{ref.label}, {layer} {list(shape)}, "
                     f"{len(labels)} images of {len(classes)} classes, perplexity {perplexity:g}")
    kernel_size = int(np.prod(shape))
    data = {"figure": "wn_fig5", "checkpoint": str(ref.checkpoint), "label": ref.label, "op": ref.op,
            "backbone": ref.backbone, "layer": layer, "kernel_shape": list(shape), "kernel_size": kernel_size,
            "dims": int(points.shape[1]), "hashed": sketch.hashes(kernel_size), "seed": seed,
            "classes_requested": int(settings.classes), "per_class_requested": int(settings.per_class),
            "classes": [names[c] for c in classes], "images_per_class": counts, "images": len(labels),
            "perplexity_requested": float(settings.perplexity), "perplexity": perplexity, "kl_divergence": kl,
            "notes": notes}
    ctx.save("wn_fig5", fig, data=data, rows=rows)
    return {"label": ref.label, "layer": layer, "images": len(labels), "classes": len(classes),
            "perplexity": perplexity, "notes": notes}


def _draw_fig5(embedded: np.ndarray, labels: list[int], classes: list[int], names: list[str], title: str):
    import matplotlib

    from dynconv.figures.output import new_figure

    fig, axes = new_figure(size=(6.0, 5.0))
    ax = axes[0, 0]
    colours = matplotlib.colormaps["tab20" if len(classes) <= 20 else "hsv"]
    labels_array = np.asarray(labels)
    for rank, c in enumerate(classes):
        mask = labels_array == c
        colour = colours(rank if len(classes) <= 20 else rank / len(classes))
        ax.scatter(embedded[mask, 0], embedded[mask, 1], s=10, color=colour, label=names[c], linewidths=0)
    if len(classes) <= 20:
        ax.legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of per-sample kernels (WeightNet Fig. 5)\n{title}", fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------- Fig. 6


def similarity_summary(matrix: torch.Tensor) -> dict[str, float]:
    """Mean |cosine| and mean cosine over the pairs of distinct filters."""
    from dynconv.analysis.kernel_export import off_diagonal

    values = off_diagonal(matrix)
    return {"mean_abs_off_diagonal": float(values.abs().mean()), "mean_off_diagonal": float(values.mean())}


def _static_kernel(static: LoadedRun, layer: str, shape: tuple[int, ...]) -> torch.Tensor:
    module = dict(static.model.named_modules()).get(layer)
    if not isinstance(module, torch.nn.Conv2d) or tuple(module.weight.shape) != tuple(shape):
        found = "no such module" if module is None else (
            f"{type(module).__name__} {list(getattr(module, 'weight', torch.empty(0)).shape)}")
        raise ValueError(f"{static.ref.label} ({static.ref.checkpoint}) has no nn.Conv2d {layer} of the dynamic "
                         f"layer's kernel shape {list(shape)} ({found}): the networks differ")
    return module.weight.detach().cpu()


@figure("wn_fig6", "wn", "Cosine similarity between one layer's filters: static vs per-sample kernels (Fig. 6)",
        "two classification checkpoints of one backbone, op=static and a per-sample op (op=weightnet first; the "
        "paper: shufflenetv2_wn_x0_5); the dynamic one's validation split; kernels.layer / samples / filters")
def wn_fig6(ctx: FigureContext) -> dict[str, Any]:
    from dynconv.analysis.kernel_export import filter_cosine_similarity

    static_ref, dynamic_ref = _fig6_pair(ctx)
    dynamic = ctx.load(dynamic_ref)
    static = ctx.load(static_ref)
    settings = ctx.cfg.kernels
    seed = int(ctx.cfg.seed)
    targets = _targets(dynamic)
    indices = pick_distinct(targets, int(settings.samples), seed)
    layer, kernels, labels, positions, shape = record_kernels(ctx, dynamic, indices)
    static_kernel = _static_kernel(static, layer, shape)

    names = dynamic.class_names
    matrices = {"static": filter_cosine_similarity(static_kernel)}
    panels = [("static", f"(a) static: {static_ref.label}")]
    for number, (kernel, c, index) in enumerate(zip(kernels, labels, positions)):
        key = f"image {index}"
        matrices[key] = filter_cosine_similarity(kernel)
        panels.append((key, f"({chr(ord('b') + number)}) {dynamic_ref.op}: image {index} ({names[c]})"))
    summaries = {key: similarity_summary(matrix) for key, matrix in matrices.items()}
    static_mean = summaries["static"]["mean_abs_off_diagonal"]
    dynamic_means = [summaries[key]["mean_abs_off_diagonal"] for key, _ in panels[1:]]
    below = sum(value < static_mean for value in dynamic_means)
    filters = settings.get("filters")
    shown = shape[0] if filters is None else min(int(filters), shape[0])

    fig = _draw_fig6(matrices, panels, summaries, shown, f"{layer}: {shape[0]} filters of {list(shape[1:])}"
                     + ("" if shown == shape[0] else f", the first {shown} shown"))
    data = {"figure": "wn_fig6", "layer": layer, "kernel_shape": list(shape), "filters_shown": shown, "seed": seed,
            "static": {"checkpoint": str(static_ref.checkpoint), "label": static_ref.label},
            "dynamic": {"checkpoint": str(dynamic_ref.checkpoint), "label": dynamic_ref.label, "op": dynamic_ref.op},
            "images": [{"image": index, "class": names[c]} for c, index in zip(labels, positions)],
            "summary": summaries,
            "comparison": {"static_mean_abs_off_diagonal": static_mean,
                           "dynamic_mean_abs_off_diagonal": float(np.mean(dynamic_means)),
                           "dynamic_images_below_static": below, "dynamic_images": len(dynamic_means)},
            "matrices": {key: np.round(matrix[:shown, :shown].numpy(), 4) for key, matrix in matrices.items()}}
    rows = [{"matrix": key, "layer": layer, **({"image": positions[number - 1], "class": names[labels[number - 1]]}
                                               if number else {"image": "", "class": ""}), **summaries[key]}
            for number, (key, _) in enumerate(panels)]
    ctx.save("wn_fig6", fig, data=data, rows=rows)
    return {"layer": layer, "static": static_ref.label, "dynamic": dynamic_ref.label, **data["comparison"]}


def _draw_fig6(matrices: dict[str, torch.Tensor], panels: list[tuple[str, str]], summaries: dict[str, dict],
               shown: int, title: str):
    from dynconv.figures.output import new_figure

    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    fig, axes = new_figure(ncols=columns, nrows=rows, size=(3.2, 3.2))
    flat = list(axes.flat)
    image = None
    for ax, (key, label) in zip(flat, panels):
        image = ax.imshow(matrices[key][:shown, :shown].numpy(), vmin=-1.0, vmax=1.0, cmap="viridis",
                          interpolation="nearest")
        ax.set_title(f"{label}\nmean |cos| off-diagonal {summaries[key]['mean_abs_off_diagonal']:.3f}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in flat[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=flat, shrink=0.6, label="cosine similarity")
    fig.suptitle(f"Cosine similarity between filters (WeightNet Fig. 6), {title}", fontsize=8)
    return fig
