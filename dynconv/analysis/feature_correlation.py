"""Pearson correlation between a layer's feature maps over a dataset (DyNet, Zhang et al. 2020, Figures 2 and 6).

DyNet plots "the distribution of the Pearson product-moment correlation coefficient between feature maps" of a
layer (Fig. 2: well-known networks; Fig. 6: the 160 maps of MobileNetV2 (1.0)'s 7th stage against Dy-MobileNetV2
(1.0)'s, "based on the validation set") and reads the redundancy of the kernels off it.

What is correlated (the paper does not spell it out; this is the convention used here): every channel of the
layer's output is one variable, and every (image, spatial position) of the split is one observation of all the
channels at once. The correlation of channels i and j is then the Pearson coefficient of the two channels'
activations over all positions of all images, the whole split pooled (not a per-image coefficient averaged over
images). A token sequence (B, N, C) (a ViT block) is read the same way with C last; a video map (B, C, T, H, W)
with every (clip, frame, position) an observation.

The statistics are streamed in float64: per channel the mean and, per pair of channels, the centred sum of
products (a C x C scatter matrix, merged batch by batch with Chan et al.'s pairwise update, so no cancellation of
large raw sums), so any number of images fits in memory. `CorrelationStats.all_reduce` combines the ranks'
statistics exactly (every rank must call it).

Strength bins (S / M / W / N in the paper's Figures 2 and 6): the paper names the four bins without giving their
bounds. Here they are the usual reading of |r| (e.g. Evans 1996, merged into four): strong |r| >= 0.6, middle
0.4 <= |r| < 0.6, weak 0.2 <= |r| < 0.4, no correlation |r| < 0.2 (`THRESHOLDS`, `correlation.thresholds` in
configs/figures.yaml). The histogram counts every pair once (the upper triangle without the diagonal); a channel
that is constant over the split (a dead ReLU) has no defined correlation and its pairs are left out.

    with FeatureCorrelation(model, "net.blocks.5") as recorder, torch.no_grad():
        for images, _ in loader:
            model(images)
    corr = recorder.correlation()                 # (C, C) numpy float64
    values = off_diagonal(corr)                    # every pair once
    fractions = strength_fractions(values)         # {"S": ..., "M": ..., "W": ..., "N": ...}
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

# |r| bounds between no / weak / middle / strong correlation (the paper's N | W | M | S).
THRESHOLDS = (0.2, 0.4, 0.6)
STRENGTHS = ("S", "M", "W", "N")
STRENGTH_NAMES = {"S": "strong", "M": "middle", "W": "weak", "N": "no correlation"}

# DyNet Fig. 6: "the 160 feature maps output by the 7th stage" of MobileNetV2 (1.0). The stages are the rows of
# MobileNetV2's Table 2 (Sandler et al. 2018): conv2d 32, then bottleneck stages of 16, 24, 32, 64, 96, 160 and
# 320 channels. The 7th is the stage of 160 channels (3 blocks, stride 2), which timm builds as `blocks.5`
# (its `conv_stem` is the first row, `blocks.0` ... `blocks.6` the seven bottleneck stages).
PAPER_LAYERS = {"mobilenetv2": "blocks.5"}


# ----------------------------------------------------------------------------------------------- statistics


class CorrelationStats:
    """Streaming float64 per-channel means and C x C centred scatter of observations (B, C, ...) tensors."""

    def __init__(self, channels: int | None = None):
        self.channels = channels
        self.count = 0
        self.mean: torch.Tensor | None = None  # (C,) float64
        self.scatter: torch.Tensor | None = None  # (C, C) float64: sum over observations of (x - mean)(x - mean)^T

    @staticmethod
    def observations(features: torch.Tensor) -> torch.Tensor:
        """(C, N) float64: the channels as rows, every (sample, position) a column. (B, C, *spatial) maps, or
        (B, N, C) token sequences (3-D: channels last)."""
        features = features.detach()
        if features.dim() < 2:
            raise ValueError(f"feature correlation needs (batch, channels, ...) maps; got {tuple(features.shape)}")
        if features.dim() == 3:  # (B, tokens, C): transformer blocks
            features = features.transpose(1, 2)
        device = features.device if features.device.type in ("cpu", "cuda") else torch.device("cpu")
        columns = features.to(device=device, dtype=torch.float64).transpose(0, 1)
        return columns.reshape(columns.shape[0], -1)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of maps (B, C, ...): every (sample, position) is one observation of the C channels."""
        x = self.observations(features)
        channels, n = x.shape
        if self.channels is None:
            self.channels = channels
        elif channels != self.channels:
            raise ValueError(f"feature maps changed from {self.channels} to {channels} channels between batches")
        if n == 0:
            return
        batch_mean = x.mean(dim=1)
        centred = x - batch_mean[:, None]
        batch_scatter = centred @ centred.T
        if self.count == 0:
            self.count, self.mean, self.scatter = n, batch_mean, batch_scatter
            return
        self._merge(n, batch_mean.to(self.mean.device), batch_scatter.to(self.mean.device))

    def _merge(self, n: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        """Chan, Golub & LeVeque's pairwise combination of two sets' (count, mean, centred scatter)."""
        total = self.count + n
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + torch.outer(delta, delta) * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def _zeros(self) -> None:
        if self.channels is None:
            raise RuntimeError("no feature maps were recorded, and the channel count is unknown")
        self.mean = torch.zeros(self.channels, dtype=torch.float64)
        self.scatter = torch.zeros(self.channels, self.channels, dtype=torch.float64)

    def all_reduce(self, device: torch.device | None = None) -> None:
        """Combine the statistics of every rank of the process group (exactly: the global mean first, then each
        rank's scatter about it); a no-op without one. Every rank must call it, after its shard; a rank that saw
        no observation needs `channels` (given at construction)."""
        import torch.distributed as dist

        from dynconv.engine.distributed import all_reduce_sum

        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.mean is None:
            self._zeros()
        if device is not None:
            self.mean, self.scatter = self.mean.to(device), self.scatter.to(device)
        local_count = float(self.count)
        summed = all_reduce_sum(torch.cat([self.mean * local_count,
                                           torch.tensor([local_count], dtype=torch.float64, device=self.mean.device)]))
        total = summed[-1].item()
        if total == 0:
            raise RuntimeError("no feature maps were recorded on any rank")
        mean = summed[:-1] / total
        delta = self.mean - mean
        self.scatter = all_reduce_sum(self.scatter + torch.outer(delta, delta) * local_count)
        self.mean, self.count = mean, int(round(total))

    def correlation(self) -> np.ndarray:
        """(C, C) float64 Pearson coefficients; rows and columns of constant channels are NaN (the diagonal too)."""
        if self.count < 2 or self.scatter is None:
            raise RuntimeError(f"a correlation needs at least 2 observations per channel; recorded {self.count}")
        scatter = self.scatter.detach().cpu().numpy()
        spread = np.sqrt(np.clip(np.diag(scatter), 0.0, None))
        # A channel whose spread is at rounding level relative to the largest is constant (up to float noise).
        constant = spread <= 1e-12 * max(float(spread.max()), 1e-300)
        spread = np.where(constant, np.nan, spread)
        corr = scatter / np.outer(spread, spread)
        return np.clip(corr, -1.0, 1.0)

    def constant_channels(self) -> int:
        """Channels with no spread over the recorded observations (their correlations are undefined)."""
        return int(np.isnan(np.diag(self.correlation())).sum())


# ------------------------------------------------------------------------------------------------- the hook


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the hooked layer returned {type(output).__name__}, not a tensor of feature maps")


class FeatureCorrelation:
    """A forward hook on `model.get_submodule(layer)` streaming its outputs into `CorrelationStats` while active.

    A context manager (or `start()` / `stop()`); only forward passes made while it is active are counted."""

    def __init__(self, model: nn.Module, layer: str, channels: int | None = None):
        try:
            self.module = model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"correlation layer {layer!r} is not a module of {type(model).__name__}; "
                             f"e.g. {', '.join(_example_names(model))}") from None
        self.layer = layer
        self.stats = CorrelationStats(channels)
        self._handle = None

    def _hook(self, module, inputs, output) -> None:
        self.stats.update(_first_tensor(output))

    def start(self) -> "FeatureCorrelation":
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "FeatureCorrelation":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def correlation(self) -> np.ndarray:
        return self.stats.correlation()


def _example_names(model: nn.Module, limit: int = 8) -> list[str]:
    names = [name for name, module in model.named_modules() if name and len(list(module.children())) > 0]
    return names[:limit] if len(names) <= limit else names[: limit - 1] + ["..."]


def layer_correlation(model: nn.Module, layer: str, batches: Iterable[torch.Tensor | Sequence[Any]],
                      channels: int | None = None) -> CorrelationStats:
    """Run `model` in eval mode without autograd over `batches` (image tensors or (images, ...) tuples) and return
    the statistics of `layer`'s outputs."""
    model.eval()
    with FeatureCorrelation(model, layer, channels) as recorder, torch.no_grad():
        for batch in batches:
            model(batch if isinstance(batch, torch.Tensor) else batch[0])
    return recorder.stats


# ---------------------------------------------------------------------------------------------- the layers


def find_backbone(model: nn.Module) -> tuple[str, nn.Module]:
    """(name prefix ending in '.' or '', the dynconv Backbone) inside a task model (itself, for classification)."""
    from dynconv.backbones.backbone import Backbone

    for name, module in model.named_modules():
        if isinstance(module, Backbone):
            return (f"{name}." if name else ""), module
    raise ValueError(f"{type(model).__name__} holds no dynconv Backbone; name the layer with correlation.layer")


def last_stage(model: nn.Module) -> tuple[str, int | None]:
    """(module name from `model`'s root, channels) of the last stage: the module whose output is the backbone's
    deepest feature map (timm's `feature_info`, else the module that produced `forward_features`' last map on a
    small probe input)."""
    prefix, backbone = find_backbone(model)
    info = getattr(backbone.net, "feature_info", None)
    if info is not None and not callable(info) and len(info) and "module" in info[-1]:
        return f"{prefix}net.{info[-1]['module']}", int(info[-1]["num_chs"])
    outputs: list[tuple[str, torch.Tensor]] = []
    handles = [module.register_forward_hook(lambda m, i, o, name=name: outputs.append((name, o)))
               for name, module in backbone.net.named_modules() if name]
    was_training = backbone.training
    try:
        backbone.eval()
        parameter = next(backbone.parameters())
        with torch.no_grad():
            maps = backbone._features(backbone.net, backbone.example_input(1, 64, device=parameter.device))
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    if not maps:
        raise ValueError(f"backbone {backbone.name} returns no feature maps; name the layer with correlation.layer")
    final = maps[-1]
    # Hooks fire child before parent: the last module whose output is the map itself is the outermost one.
    same = [name for name, output in outputs if output is final]
    if not same:
        same = [name for name, output in outputs
                if isinstance(output, torch.Tensor) and output.shape == final.shape]
    if not same:
        raise ValueError(f"backbone {backbone.name}: no module outputs its last feature map; name the layer with "
                         "correlation.layer")
    return f"{prefix}net.{same[-1]}", int(final.shape[1])


def paper_layer(model: nn.Module) -> str | None:
    """The module DyNet's Fig. 6 correlates for this backbone (MobileNetV2's 7th stage), or None."""
    prefix, backbone = find_backbone(model)
    for family, name in PAPER_LAYERS.items():
        if backbone.name.startswith(family + "_") or backbone.name == family:
            return f"{prefix}net.{name}"
    return None


def resolve_layer(model: nn.Module, layer: str | None) -> str:
    """The module name (from `model`'s root) of `layer`: null = the paper's stage (MobileNetV2: its 7th stage,
    `blocks.5`), else the last stage; a name as the library names it inside the backbone (`blocks.5`, `layer4`)
    or from the model's root (`net.blocks.5`)."""
    if layer is None:
        return paper_layer(model) or last_stage(model)[0]
    names = dict(model.named_modules())
    if layer in names:
        return layer
    prefix, _ = find_backbone(model)
    candidate = f"{prefix}net.{layer}"
    if candidate in names:
        return candidate
    raise ValueError(f"correlation.layer={layer!r} is not a module of this model; allowed values: null or a module "
                     f"name such as {', '.join(_example_names(model))}")


# ------------------------------------------------------------------------------------------ the histogram


def off_diagonal(corr: np.ndarray) -> np.ndarray:
    """Every pair of channels once (the upper triangle without the diagonal), undefined pairs dropped."""
    corr = np.asarray(corr, dtype=np.float64)
    values = corr[np.triu_indices(corr.shape[0], k=1)]
    return values[np.isfinite(values)]


def strength_fractions(values: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
    """Fractions of pairs in the paper's bins by |r|: S (>= t3), M ([t2, t3)), W ([t1, t2)), N (< t1); they sum
    to 1 (all NaN when there is no pair)."""
    low, middle, high = (float(t) for t in thresholds)
    if not 0.0 < low < middle < high <= 1.0:
        raise ValueError(f"correlation thresholds must be 0 < t1 < t2 < t3 <= 1; got {list(thresholds)}")
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    if magnitude.size == 0:
        return {key: float("nan") for key in STRENGTHS}
    total = float(magnitude.size)
    return {
        "S": float((magnitude >= high).sum()) / total,
        "M": float(((magnitude >= middle) & (magnitude < high)).sum()) / total,
        "W": float(((magnitude >= low) & (magnitude < middle)).sum()) / total,
        "N": float((magnitude < low).sum()) / total,
    }


def histogram(values: np.ndarray, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of `values` over [-1, 1] in `bins` equal bins."""
    return np.histogram(np.asarray(values, dtype=np.float64), bins=int(bins), range=(-1.0, 1.0))


def summarize(stats: CorrelationStats, bins: int = 40, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, Any]:
    """What a figure records of one layer: sizes, the histogram, the S/M/W/N fractions, mean |r|."""
    corr = stats.correlation()
    values = off_diagonal(corr)
    counts, edges = histogram(values, bins)
    return {
        "channels": int(corr.shape[0]),
        "observations": int(stats.count),
        "constant_channels": int(np.isnan(np.diag(corr)).sum()),
        "pairs": int(values.size),
        "fractions": strength_fractions(values, thresholds),
        "mean_abs_r": float(np.abs(values).mean()) if values.size else float("nan"),
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "values": values,
    }
