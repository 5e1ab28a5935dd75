"""DyNet's two exact ways to apply g fixed kernels per output channel (Zhang et al., "DyNet: Dynamic
Convolution for Accelerating Convolutional Neural Networks", 2020, Sec. 3.2).

A dynamic layer holds weight (C_out, g, C_in/groups, k, k): output channel t has g fixed kernels w_t^i, and a
sample's coefficients eta (B, C_out, g) fuse them.

- "kernels" (Eq. 1): w~_t = sum_i eta_t^i w_t^i, one kernel per output channel and sample, then one
  convolution per sample through `per_sample_conv2d` (at batch 1 a plain convolution: the inference path).
- "features" (Eq. 2, the paper's training scheme): O_t^i = w_t^i * x for all C_out*g kernels as one static
  convolution, then O~_t = sum_i eta_t^i O_t^i. Same result by linearity; costs g convolutions' MACs but no
  per-sample kernel (and no per-sample kernel gradient).

`dynet_conv2d(..., fusion="auto")` asks the one selector (`dynconv.functional.selector`), like every dynamic
operator: measured once per layer shape class and cached; the cost model below under torch.compile, with
`deterministic=true` or DYNCONV_CONV_ALGORITHM=model. DYNCONV_CONV_ALGORITHM=outputs forces feature fusion
(it is the mixture mode "mix the outputs"), kernels/fused or a per-sample algorithm force kernel fusion. MAC
counting (`counting_macs`) always takes kernel fusion, the formulation the paper counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconv.functional import kernel_capture, recompute, selector
from dynconv.functional.mixture import KERNEL_ELEMENT_COST
from dynconv.functional.per_sample import conv_output_size, per_sample_conv2d

FUSIONS = ("auto", "features", "kernels")
# Kernel elements per output channel (C/groups*kh*kw) up to which one image's kernels are fused by a broadcast
# product and a sum instead of a batched matmul: MKL's batched (1 x g) @ (g x K) products carry a fixed cost per
# output channel that dominates small K (measured on 1 CPU thread, g = 6: K = 54-66 takes 3x longer with bmm,
# K >= 324 is 2-3x faster with it). Dy-mobile's grouped 3x3 (K = 54) and its narrow 1x1 layers fall below.
BROADCAST_MAX_ELEMENTS = 128


def fuse_kernels(weight: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Eq. 1: (C_out, g, C/groups, kh, kw) kernels and (B, C_out, g) coefficients -> (B, C_out, C/groups, kh, kw).

    One batched matmul over the output channels ((B x g) @ (g x C/groups*kh*kw) per channel), which MAC counting
    sees: kernel generation costs B * g * |w~| multiply-accumulates, as the paper counts it. One image with small
    kernels takes a broadcast product instead (same values; `BROADCAST_MAX_ELEMENTS`), never while counting.
    """
    out_channels, group_size = weight.shape[:2]
    batch = coefficients.shape[0]
    flat = weight.reshape(out_channels, group_size, -1)
    # Exporting first: an exported graph serves every batch size, and comparing its symbolic batch would branch.
    if (not selector.is_exporting() and batch == 1 and flat.shape[-1] <= BROADCAST_MAX_ELEMENTS
            and not selector.is_counting_macs()):
        kernels = (coefficients[0].unsqueeze(-1) * flat).sum(dim=1)  # (C_out, K)
        return kernels.view(1, out_channels, *weight.shape[2:])
    kernels = torch.bmm(coefficients.transpose(0, 1), flat)  # (C_out, B, K)
    return kernels.transpose(0, 1).reshape(batch, out_channels, *weight.shape[2:])


def by_kernels(x, weight, coefficients, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """Eq. 1 then one convolution per sample (the inference path; batch 1 is a plain convolution)."""
    sample_bias = None if bias is None else bias.expand(x.shape[0], -1)
    with recompute.materialised(lambda note: note(fuse_kernels(weight, coefficients)), x, weight,
                                coefficients) as kernels:
        return per_sample_conv2d(x, kernels, sample_bias, stride, padding, dilation, groups)


def by_features(x, weight, coefficients, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """Eq. 2: the C_out*g fixed kernels as one static convolution, outputs fused per sample.

    Laid out (C_out, g, ...) -> (C_out*g, ...), kernel i of output t is output channel t*g + i, which falls in
    the same convolution group as t (groups split the output channels into contiguous runs), so a grouped
    layer stays one grouped convolution.
    """
    out_channels, group_size = weight.shape[:2]
    outputs = F.conv2d(x, weight.reshape(out_channels * group_size, *weight.shape[2:]), None, stride, padding,
                       dilation, groups)
    batch, _, height, width = outputs.shape
    fused = torch.matmul(coefficients.unsqueeze(2), outputs.view(batch, out_channels, group_size, height * width))
    fused = fused.view(batch, out_channels, height, width)
    return fused if bias is None else fused + bias.view(1, -1, 1, 1)


_FUSION = {"kernels": by_kernels, "features": by_features}


def dynet_conv2d(x: torch.Tensor, weight: torch.Tensor, coefficients: torch.Tensor, bias: torch.Tensor | None = None,
                 stride=1, padding=0, dilation=1, groups: int = 1, fusion: str = "auto") -> torch.Tensor:
    """y_b = (sum_i eta_b[:, i] w[:, i]) * x_b (+ bias) for weight (C_out, g, C/groups, kh, kw) and coefficients
    (B, C_out, g); `fusion` is "kernels" (Eq. 1), "features" (Eq. 2) or "auto" (the selector's choice)."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; allowed: {', '.join(FUSIONS)}")
    geometry = (stride, padding, dilation, groups)
    if kernel_capture.active():  # analysis: fuse kernels, so that per_sample_conv2d records them
        fusion = "kernels"
    if fusion == "auto":
        fusion = selector.select(FUSION, (x, weight, coefficients, bias), geometry)
    return _FUSION[fusion](x, weight, coefficients, bias, *geometry)


class FusionRoutine(selector.Routine):
    """`dynet_conv2d` for the selector; tensors = (x, weight, coefficients, bias), params = (stride, padding,
    dilation, groups). A forced "outputs" means feature fusion (it is the mixture mode "mix the outputs");
    "kernels", "fused" and the per-sample algorithms mean kernel fusion (they need the fused kernels)."""

    name = "dynet_conv2d"
    makes_kernels = True
    algorithms = ("features", "kernels")
    canonical = "kernels"  # what the paper counts
    forced = {"outputs": "features", "kernels": "kernels", "fused": "kernels",
              **{name: "kernels" for name in selector.PER_SAMPLE_ALGORITHMS}}
    batch_free = ("features", "kernels")  # both, once `fuse_kernels` skips its batch-1 branch while exporting

    def cost_model(self, tensors, params):
        """Kernel fusion at batch 1 (one plain convolution); else g convolutions' MACs for feature fusion
        against one convolution plus the per-sample kernels (generated, written and read, with their gradient;
        `KERNEL_ELEMENT_COST` MACs each)."""
        if tensors[0].shape[0] == 1:
            return "kernels"
        return self.export_choice(tensors, params)

    def export_choice(self, tensors, params):
        """The cost model without its batch-1 rule, per sample (the batch cancels): per kernel element,
        P + g + KERNEL_ELEMENT_COST against g * P, P the output positions."""
        x, weight = tensors[:2]
        out_h, out_w = conv_output_size(x, weight.shape[-2:], *params[:3])
        positions, group_size = out_h * out_w, weight.shape[1]
        return "kernels" if positions + group_size + KERNEL_ELEMENT_COST < group_size * positions else "features"

    def macs(self, tensors, params):
        x, weight = tensors[:2]
        out_h, out_w = conv_output_size(x, weight.shape[-2:], *params[:3])
        return weight[:, 0].numel() * x.shape[0] * out_h * out_w

    def timed(self, tensors, params):
        return list(_FUSION)

    def shape_key(self, tensors, params):
        x, weight, _, bias = tensors
        return selector.conv_shape_key(x, weight.shape, *params, ("bias",) if bias is not None else ())

    def run(self, algorithm, tensors, params):
        return _FUSION[algorithm](*tensors, *params)


FUSION = FusionRoutine()
