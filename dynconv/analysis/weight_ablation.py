"""Weight ablation: the accuracy lost when chosen convolution weights are zeroed (Weight Excitation, Quader et al.,
ECCV 2020, Sec. 3.1, Figures 1a and 2).

The paper measures a weight's importance as the "decrease in performance D" of a trained network when the weight
is made zero (as in Optimal Brain Damage). Two studies, both on an ImageNet-pretrained ResNet50:

- magnitude (Fig. 1a): "(1) sort weights in each convolution layer in ascending order of absolute values of
  weights, (2) make the b-th percentile position (b in {1, ..., 100}) weight of the sorted absolute weights of each
  layer zero and record the decrease in performance D". `position_curve` does this: for each b it zeroes one
  weight in every layer at once (the nearest-rank position ceil(b / P * n) of the layer's n weights sorted by |w|,
  ties kept in index order) and scores the network once. Whether the layers were ablated together or one at a
  time the text leaves open; one curve with one D per b is what Fig. 1a shows, hence together.
  `bin_curves` is a per-layer companion (not in the paper): every weight of the b-th of P equal-count magnitude
  bins of one layer zeroed, the other layers intact; one curve per layer.
- location (Fig. 2): "(1) select all the L convolutional blocks having 3 x 3 filters (L = 16 for ResNet50),
  (2) for each, select N1 output channels equidistant from each other, (3) for each, select N2 input channels
  equidistant from each other, (4) zero each of the weights in S_{l,O_j,I_i} [one 3 x 3 kernel] and record D";
  N1 = N2 = 5, a 5 x 5 map of D per layer. `kernel_maps` does this. "Equidistant" is read as the rounded points of
  linspace(0, C - 1, N): the first and the last channel and N - 2 evenly between (fewer when C < N).

Scoring: the images are loaded once (`cache_images`) and every ablation is scored on the same tensors in eval
mode (`CachedScorer`), so D is free of data-order noise and no ablation re-reads data. D is reported both as the
drop of top-1 accuracy in percentage points (the paper's "performance") and as the rise of the mean
cross-entropy (finer when few images are scored). Every zeroed weight is restored bit for bit from a clone
before the next ablation (`zeroed`). Re-running only the part of the network after the ablated layer would be
faster, but a layer's output also feeds residual branches, so it is not done: each ablation is a full forward.

Which weights: the network as it runs at inference (`inference_model`): training-time weight
reparameterisations (Weight Excitation's LWE / MWE, weight standardisation) are folded into plain weights first,
so the weight zeroed is the one the convolution applies. Dynamic operators keep their static kernel `weight`
(CGC's W, DCD's W_0) and that is ablated; a layer whose kernel is not one plain (Out, In / groups, kh, kw)
tensor (a bank of kernels mixed per sample, a warehouse, a generated kernel) is listed with the reason and left
out. Convolutions inside squeeze-excitation branches (role `se`) are not the network's layers in the paper's sense
and are not listed either.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EXCLUDED_ROLES = ("se", "classifier", "attention", "mlp")  # not convolutions of the network's own path


@dataclass
class AblationLayer:
    """One convolution of the network: the tensor that is zeroed, or why it cannot be."""

    name: str  # as in model.named_modules()
    module: nn.Module
    weight: torch.Tensor | None  # the layer's plain kernel (Out, In / groups, kh, kw); None when skipped
    reason: str | None = None  # why the layer is left out

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape) if self.weight is not None else ()

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(getattr(self.module, "kernel_size", ()))


@dataclass(frozen=True)
class Score:
    top1: float  # % of the images classified right
    loss: float  # mean cross-entropy
    images: int


# ------------------------------------------------------------------------------------------------- layers


def inference_model(model: nn.Module) -> nn.Module:
    """`model` itself, or a copy with its weight parametrizations folded (`dynconv.profiling.fold_for_inference`)
    when it has any: the weights zeroed are then the ones the convolutions apply."""
    from torch.nn.utils import parametrize

    if not any(parametrize.is_parametrized(module) for module in model.modules()):
        return model
    from dynconv.profiling import fold_for_inference

    return fold_for_inference(model)


def _is_conv_layer(module: nn.Module) -> bool:
    """A 2-D convolution: nn.Conv2d, or an operator's drop-in for one (it has in/out channels and a 2-D kernel)."""
    if isinstance(module, nn.Conv2d):
        return True
    if isinstance(module, nn.modules.conv._ConvNd):
        return False  # 1-D / 3-D convolutions
    kernel = getattr(module, "kernel_size", None)
    return (hasattr(module, "in_channels") and hasattr(module, "out_channels") and isinstance(kernel, tuple)
            and len(kernel) == 2)


def _plain_weight(module: nn.Module) -> tuple[torch.Tensor | None, str | None]:
    """The layer's kernel when it is one (Out, In / groups, kh, kw) tensor, else (None, why not)."""
    weight = getattr(module, "weight", None)
    kind = type(module).__name__
    if not isinstance(weight, torch.Tensor):
        return None, f"{kind} has no static kernel `weight` (its kernel is made per sample)"
    expected = (module.out_channels, module.in_channels // getattr(module, "groups", 1), *module.kernel_size)
    if tuple(weight.shape) != expected:
        return None, (f"{kind}.weight has shape {tuple(weight.shape)}, not one convolution kernel {expected} "
                      "(a bank of kernels combined per sample)")
    return weight, None


def _role(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """The backbone's role for a layer of `model.net` (dynconv Backbones describe their layers), else None."""
    place = getattr(model, "place", None)
    if not callable(place) or not name.startswith("net."):
        return None
    try:
        return place(name[len("net."):], module).role
    except LookupError:
        return None


def conv_layers(model: nn.Module) -> list[AblationLayer]:
    """Every 2-D convolution of the network in module order, each with its plain kernel or the reason it has none.
    The modules inside a layer (an operator's attention branch) are part of that layer, not layers of their own."""
    root = model.net if isinstance(getattr(model, "net", None), nn.Module) and callable(getattr(model, "place", None)) \
        else model
    prefix = "net." if root is not model else ""
    layers: list[AblationLayer] = []
    taken: list[str] = []
    for relative, module in root.named_modules():
        name = prefix + relative
        if not relative or any(name.startswith(outer + ".") for outer in taken) or not _is_conv_layer(module):
            continue
        taken.append(name)
        if _role(model, name, module) in EXCLUDED_ROLES:
            continue
        weight, reason = _plain_weight(module)
        layers.append(AblationLayer(name, module, weight, reason))
    return layers


def select_layers(layers: Sequence[AblationLayer], names: Sequence[str] | None = None,
                  kernel_size: tuple[int, int] | None = None, max_layers: int | None = None
                  ) -> tuple[list[AblationLayer], list[AblationLayer]]:
    """(the layers to ablate, the layers left out with a reason). `names`: these layers, in this order (a name
    inside a dynconv Backbone may leave out the leading `net.`); `kernel_size`: only kernels of that size;
    `max_layers`: at most that many, evenly spaced over depth (the first and the last kept)."""
    if names is not None:
        by_name = {layer.name: layer for layer in layers}
        chosen = []
        for wanted in names:
            layer = by_name.get(wanted) or by_name.get(f"net.{wanted}")
            if layer is None:
                shown = ", ".join(list(by_name)[:8]) + (", ..." if len(by_name) > 8 else "")
                raise ValueError(f"ablation.layers: {wanted!r} is not a convolution of this network; allowed values "
                                 f"(convolutions in order): {shown}")
            chosen.append(layer)
    else:
        chosen = list(layers)
    skipped = [layer for layer in chosen if layer.weight is None]
    usable = [layer for layer in chosen if layer.weight is not None]
    if kernel_size is not None:
        usable = [layer for layer in usable if layer.kernel_size == tuple(kernel_size)]
    if max_layers is not None and len(usable) > max_layers:
        keep = evenly_spaced(len(usable), max_layers)
        usable = [usable[index] for index in keep]
    return usable, skipped


def evenly_spaced(count: int, samples: int) -> list[int]:
    """`samples` indices into range(count), equidistant, the first and the last included (round half up);
    fewer, without repeats, when count < samples."""
    if samples <= 0 or count <= 0:
        return []
    if samples == 1:
        return [0]
    picked = [math.floor(index * (count - 1) / (samples - 1) + 0.5) for index in range(samples)]
    return sorted(set(picked))


# ---------------------------------------------------------------------------------------------- scoring


def cache_images(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (images, targets) of `batches` concatenated: read once, scored by every ablation."""
    images, targets = [], []
    for batch_images, batch_targets in batches:
        images.append(batch_images)
        targets.append(batch_targets)
    if not images:
        raise ValueError("no validation images to score the ablations on")
    return torch.cat(images), torch.cat(targets)


class CachedScorer:
    """Top-1 accuracy and mean cross-entropy of a classifier on images held in memory, in chunks of `batch_size`."""

    def __init__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 256):
        self.model, self.images, self.targets = model, images, targets
        self.batch_size = max(int(batch_size), 1)
        self.evaluations = 0

    def __call__(self) -> Score:
        correct, loss_sum = 0, 0.0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, self.images.shape[0], self.batch_size):
                    logits = self.model(self.images[start:start + self.batch_size]).float()
                    targets = self.targets[start:start + self.batch_size]
                    correct += int((logits.argmax(dim=1) == targets).sum())
                    loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        finally:
            self.model.train(was_training)
        self.evaluations += 1
        count = self.images.shape[0]
        return Score(100.0 * correct / count, loss_sum / count, count)


@contextlib.contextmanager
def zeroed(masks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Zero `weight[mask]` for every (weight, mask) pair; on exit every weight holds its exact former values."""
    with torch.no_grad():
        saved = [weight.detach().clone() for weight, _ in masks]
        try:
            for weight, mask in masks:
                weight.masked_fill_(mask, 0.0)
            yield
        finally:
            for (weight, _), original in zip(masks, saved):
                weight.copy_(original)


@contextlib.contextmanager
def zeroed_entries(entries: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """`zeroed` for a few weights given by flat index (1-D tensor) per tensor: only those values are saved."""
    with torch.no_grad():
        places = [(weight, torch.unravel_index(index, weight.shape)) for weight, index in entries]
        saved = [weight[place].clone() for weight, place in places]
        try:
            for weight, place in places:
                weight[place] = 0.0
            yield
        finally:
            for (weight, place), original in zip(places, saved):
                weight[place] = original


def drop(baseline: Score, ablated: Score) -> dict[str, float]:
    """D = performance(original) - performance(ablated): top-1 points lost, and cross-entropy gained."""
    return {"top1": ablated.top1, "loss": ablated.loss, "drop_top1": baseline.top1 - ablated.top1,
            "drop_loss": ablated.loss - baseline.loss}


# --------------------------------------------------------------------------------------- magnitude (Fig. 1)


def magnitude_order(weight: torch.Tensor) -> torch.Tensor:
    """Flat indices of `weight` sorted by ascending |w| (a stable sort: equal magnitudes stay in index order)."""
    return torch.sort(weight.detach().abs().flatten(), stable=True).indices


def percentile_positions(weight: torch.Tensor, percentiles: int) -> torch.Tensor:
    """Flat index of the b-th percentile weight by |w| for b = 1..percentiles: nearest rank ceil(b / P * n)."""
    order = magnitude_order(weight)
    n = order.numel()
    ranks = [min(max(math.ceil(b * n / percentiles), 1), n) for b in range(1, percentiles + 1)]
    return order[torch.tensor(ranks, device=order.device) - 1]


def magnitude_bins(weight: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin (0..bins-1) of every weight, shaped as `weight`: weights ranked by |w| and cut into `bins` groups of
    equal count (+-1), so the bins partition the layer and bin k's magnitudes never exceed bin k+1's."""
    order = magnitude_order(weight)
    n = order.numel()
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(n, device=order.device)
    return (ranks * bins // n).view(weight.shape)


def position_curve(scorer: CachedScorer, layers: Sequence[AblationLayer], percentiles: int,
                   baseline: Score | None = None) -> list[dict]:
    """Fig. 1a as the paper describes it: for b = 1..percentiles, the b-th percentile weight of every layer zeroed
    at once; one row per b with D and the mean |w| of the weights zeroed."""
    baseline = baseline or scorer()
    positions = [percentile_positions(layer.weight, percentiles) for layer in layers]
    # |w| of each layer's chosen weights, (layers, percentiles)
    magnitudes = torch.stack([layer.weight.detach().flatten()[chosen].abs().float().cpu()
                              for layer, chosen in zip(layers, positions)])
    rows = []
    for b in range(percentiles):
        with zeroed_entries([(layer.weight, chosen[b:b + 1]) for layer, chosen in zip(layers, positions)]):
            score = scorer()
        rows.append({"percentile": b + 1, "layers": len(layers), "mean_abs_weight": float(magnitudes[:, b].mean()),
                     **drop(baseline, score)})
    return rows


def bin_curves(scorer: CachedScorer, layers: Sequence[AblationLayer], bins: int,
               baseline: Score | None = None) -> list[dict]:
    """Per layer and magnitude bin: every weight of the bin zeroed in that layer alone; one row per (layer, bin)."""
    baseline = baseline or scorer()
    rows = []
    for depth, layer in enumerate(layers):
        assignment = magnitude_bins(layer.weight, bins)
        magnitude = layer.weight.detach().abs()
        for index in range(bins):
            mask = assignment == index
            if not bool(mask.any()):
                continue  # more bins than weights
            with zeroed([(layer.weight, mask)]):
                score = scorer()
            rows.append({"layer": layer.name, "depth": depth, "bin": index + 1, "bins": bins,
                         "percentile_low": 100.0 * index / bins, "percentile_high": 100.0 * (index + 1) / bins,
                         "abs_weight_min": float(magnitude[mask].min()), "abs_weight_max": float(magnitude[mask].max()),
                         "weights": int(mask.sum()), **drop(baseline, score)})
    return rows


# ---------------------------------------------------------------------------------------- location (Fig. 2)


def kernel_samples(weight: torch.Tensor, count: int) -> tuple[list[int], list[int]]:
    """(output channels, input channels) sampled equidistantly, N1 = N2 = `count` (the paper: 5)."""
    return evenly_spaced(weight.shape[0], count), evenly_spaced(weight.shape[1], count)


def kernel_maps(scorer: CachedScorer, layers: Sequence[AblationLayer], count: int,
                baseline: Score | None = None) -> list[dict]:
    """Fig. 2: for each layer, each sampled (output channel O_j, input channel I_i) kernel zeroed alone; one row
    per kernel with D. A map is the rows of one layer, O_j down and I_i across."""
    baseline = baseline or scorer()
    rows = []
    for depth, layer in enumerate(layers):
        outputs, inputs = kernel_samples(layer.weight, count)
        for row, out_channel in enumerate(outputs):
            for column, in_channel in enumerate(inputs):
                mask = torch.zeros(layer.weight.shape, dtype=torch.bool, device=layer.weight.device)
                mask[out_channel, in_channel] = True
                with zeroed([(layer.weight, mask)]):
                    score = scorer()
                rows.append({"layer": layer.name, "depth": depth, "row": row, "column": column,
                             "out_channel": out_channel, "in_channel": in_channel,
                             "kernel_abs_sum": float(layer.weight.detach()[out_channel, in_channel].abs().sum()),
                             **drop(baseline, score)})
    return rows
