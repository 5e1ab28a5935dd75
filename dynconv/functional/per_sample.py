"""The one per-sample convolution routine shared by every dynamic operator: y_b = W_b * x_b.

PyTorch has no batched convolution with per-sample weights, so this module offers several exact ways to
compute it:

- "folded": the batch folded into the groups of one grouped convolution (B*O output channels, B*g groups);
  best when the output has many positions (early layers, detection resolutions) and on GPUs (cuDNN).
- "bmm": im2col (`dynconv.functional.im2col`) and one batched matmul (per group: a grouped or depthwise
  convolution is a matmul per group on its own rows of the columns); on CPU far faster than a grouped
  convolution when the output has few positions (late layers, small images), where the grouped kernels are
  poorly optimised. It is also the batch-independent formulation that export records (`selector.exporting()`):
  the batch stays the leading dimension of every tensor, where "folded" makes it a convolution's group count, a
  constant in ONNX.
- "bmm_t": "bmm" whose backward computes the columns' gradient positions-major, (L x O) by (O x C*kh*kw) per
  sample, instead of autograd's (C*kh*kw x O) by (O x L). With few output positions L (ResNet's 7x7 stage: 49)
  autograd's layout gives the matmul 49-wide output rows, which vector registers tile badly; the transposed one
  has C*kh*kw-wide rows. Measured on a 2-core Xeon (AVX-512), batch 16, forward + backward: 1.18-1.23x faster
  than "bmm" for 7x7 outputs, 0.5-0.86x for 14x14 and above, so it is timed for training calls with at most
  `BMM_T_MAX_OUTPUT_POSITIONS` output positions only. The forward is "bmm"'s; grouped layers (forced) run bmm's.
- "loop": one convolution per sample; the plain reference, and sometimes the fastest at large resolutions.
- batch size 1 always takes a plain convolution, except while exporting (a branch on the batch size would
  freeze the exported graph to one side of it).

Which algorithm runs is `dynconv.functional.selector`'s decision (measured once per layer shape class and
cached by default; the cost model below under torch.compile or with DYNCONV_CONV_ALGORITHM=model).

MAC counting (`torch.utils.flop_counter`) reads the input channels per group from the weight (C/g), so the
folded path (the canonical one, what `counting_macs()` selects) counts exactly B*O*(C/g)*k*k*H'*W'.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from dynconv.functional import kernel_capture, selector
from dynconv.functional.im2col import im2col

Algorithm = Literal["auto", "folded", "bmm", "bmm_t", "loop"]
ALGORITHMS = ("auto",) + selector.PER_SAMPLE_ALGORITHMS

# Cost model. CPU: below this many output positions the im2col+bmm path beats a grouped convolution (measured
# on 2 cores: ResNet18 3x3 layers, batch 16-64, 1x1 to 56x56 outputs; the crossover sits near 14x14).
BMM_MAX_OUTPUT_POSITIONS = 196
# The per-sample loop is timed only for small batches: at batch 16 it measured 5-12x slower than the others on
# every ResNet18 layer (2 CPU cores), so timing it there would only make the first step slower.
LOOP_MAX_BATCH = 4
# "bmm_t" is timed only below this many output positions (and only when the input needs a gradient: its forward is
# bmm's): it won at 7x7 (49) and lost at 14x14 (196) on every ResNet18 shape measured (module docstring).
BMM_T_MAX_OUTPUT_POSITIONS = 100


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_output_size(x: torch.Tensor, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    kh, kw = _pair(kernel_size)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    height = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return height, width


def choose_algorithm(x: torch.Tensor, weight: torch.Tensor, groups: int, out_positions: int) -> str:
    """The cost model's per-sample algorithm (no timing)."""
    if x.device.type == "cpu" and groups == 1 and out_positions <= BMM_MAX_OUTPUT_POSITIONS:
        return "bmm"
    return "folded"


def per_sample_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    algorithm: Algorithm = "auto",
) -> torch.Tensor:
    """Convolve sample b of x (B, C, H, W) with its own kernel weight[b] (B, O, C/groups, kh, kw).

    bias, if given, is per sample: (B, O). Any stride, padding, dilation and groups (depthwise included).
    "auto" takes the algorithm the selector picks for this shape (measured once and cached by default).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; allowed: {', '.join(ALGORITHMS)}")
    batch, channels = x.shape[:2]
    if weight.dim() != 5 or weight.shape[0] != batch:
        raise ValueError(f"per-sample weight must be (B={batch}, O, C/g, kh, kw), got {tuple(weight.shape)}")
    if weight.shape[2] * groups != channels:
        raise ValueError(
            f"weight expects {weight.shape[2] * groups} input channels (groups={groups}), input has {channels}"
        )
    if kernel_capture.active():  # analysis only (dynconv.analysis.kernel_export): the kernels this call applies
        kernel_capture.record(weight, bias, stride, padding, dilation, groups)
    if not selector.is_exporting() and batch == 1:
        # No folding needed: a plain convolution.
        return F.conv2d(x, weight[0], None if bias is None else bias[0], stride, padding, dilation, groups)
    tensors, geometry = (x, weight, bias), (stride, padding, dilation, groups)
    if algorithm == "auto":
        algorithm = selector.select(PER_SAMPLE, tensors, geometry)
    return _PER_SAMPLE[algorithm](x, weight, bias, stride, padding, dilation, groups)


class PerSampleRoutine(selector.Routine):
    """`per_sample_conv2d` for the selector; params = (stride, padding, dilation, groups)."""

    name = "per_sample_conv2d"
    algorithms = selector.PER_SAMPLE_ALGORITHMS
    canonical = "folded"
    forced = {name: name for name in selector.PER_SAMPLE_ALGORITHMS}
    batch_free = ("bmm",)

    def cost_model(self, tensors, params):
        x, weight, _ = tensors
        stride, padding, dilation, groups = params
        out_h, out_w = conv_output_size(x, weight.shape[-2:], stride, padding, dilation)
        return choose_algorithm(x, weight, groups, out_h * out_w)

    def macs(self, tensors, params):
        x, weight, _ = tensors
        out_h, out_w = conv_output_size(x, weight.shape[-2:], *params[:3])
        return weight[0].numel() * x.shape[0] * out_h * out_w

    def timed(self, tensors, params):
        # bmm is timed for groups = 1 only, as before it handled grouped layers (it was generalised for export): a
        # depthwise layer is g products of 1 x 9 by 9 x P per sample, which a grouped convolution does in one call.
        # Not measured against it, so training keeps its earlier candidates.
        x, weight, _ = tensors
        names = ["folded"] + (["bmm"] if params[3] == 1 else [])
        out_h, out_w = conv_output_size(x, weight.shape[-2:], *params[:3])
        if (params[3] == 1 and x.requires_grad and torch.is_grad_enabled()
                and out_h * out_w <= BMM_T_MAX_OUTPUT_POSITIONS):
            names.append("bmm_t")  # the same forward as bmm: worth timing only where the backward runs
        return names + (["loop"] if x.shape[0] <= LOOP_MAX_BATCH else [])

    def shape_key(self, tensors, params):
        x, weight, bias = tensors
        return selector.conv_shape_key(x, weight.shape, *params, ("bias",) if bias is not None else ())

    def run(self, algorithm, tensors, params):
        return _PER_SAMPLE[algorithm](*tensors, *params)


PER_SAMPLE = PerSampleRoutine()


def _loop(x, weight, bias, stride, padding, dilation, groups):
    return torch.cat([F.conv2d(x[b : b + 1], weight[b], None if bias is None else bias[b], stride, padding,
                               dilation, groups) for b in range(x.shape[0])])


class _BmmTransposedGrad(torch.autograd.Function):
    """weight (B, O, K) @ columns (B, K, L), with the columns' gradient computed as (grad^T @ weight)^T: the same
    values as autograd's weight^T @ grad (each a sum over the O output channels), laid out L-major by the matmul."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(weight, columns)
        # Under autocast bmm multiplies both in autocast's dtype: the backward's products must see them so too
        # (the engine casts each gradient back to its input's dtype).
        ctx.save_for_backward(weight.to(out.dtype), columns.to(out.dtype))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, columns = ctx.saved_tensors
        need_weight, need_columns = ctx.needs_input_grad
        grad_weight = torch.bmm(grad, columns.transpose(1, 2)) if need_weight else None
        grad_columns = None
        if need_columns:
            grad_columns = torch.bmm(grad.transpose(1, 2).contiguous(), weight).transpose(1, 2)
        return grad_weight, grad_columns


def _bmm_t(x, weight, bias, stride, padding, dilation, groups):
    return _bmm(x, weight, bias, stride, padding, dilation, groups, matmul=_BmmTransposedGrad.apply)


def _bmm(x, weight, bias, stride, padding, dilation, groups, matmul=torch.bmm):
    batch, out_channels = weight.shape[:2]
    out_h, out_w = conv_output_size(x, weight.shape[-2:], stride, padding, dilation)
    columns = im2col(x, weight.shape[-2:], dilation, padding, stride)
    if groups == 1:
        out = matmul(weight.reshape(batch, out_channels, -1), columns)
    else:
        # The columns are channel-major (C*kh*kw rows, channel c's taps together), so group j's inputs are the
        # j-th run of C/g*kh*kw rows: one matmul per (sample, group), (O/g x C/g*kh*kw) by (C/g*kh*kw x L).
        columns = columns.view(batch, groups, -1, columns.shape[-1])
        out = torch.matmul(weight.reshape(batch, groups, out_channels // groups, -1), columns)
        out = out.reshape(batch, out_channels, -1)
    if bias is not None:  # in the product's dtype, as a convolution adds its bias (under autocast: bfloat16 too)
        out = out + bias.unsqueeze(-1).to(out.dtype)
    return out.view(batch, out_channels, out_h, out_w)


def _folded(x, weight, bias, stride, padding, dilation, groups):
    batch, channels = x.shape[:2]
    out_channels = weight.shape[1]
    folded = F.conv2d(x.reshape(1, batch * channels, *x.shape[2:]), weight.reshape(batch * out_channels,
                      *weight.shape[2:]), None if bias is None else bias.reshape(-1), stride, padding, dilation,
                      groups * batch)
    return folded.view(batch, out_channels, *folded.shape[2:])


# Looked up at call time (tests wrap the entries to see which algorithm ran).
_PER_SAMPLE = {"folded": _folded, "bmm": _bmm, "bmm_t": _bmm_t, "loop": _loop}
