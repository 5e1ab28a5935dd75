"""im2col: the k x k neighbourhoods of every output position as columns, laid out as `F.unfold` lays them out
(B, C*kh*kw, L): channel-major, the kernel taps of channel c in rows c*kh*kw ... (c+1)*kh*kw - 1, row-major taps.

Built from kh*kw strided slices of the padded input, stacked, rather than by `F.unfold`: the same values, but an
exported graph of slices runs several times faster. torch.onnx translates `F.unfold` into Gathers with index
tensors, which onnxruntime ran 6x slower than these slices for a 3x3 per-sample convolution of 64 channels at 56x56
(21 ms against 3.6 ms at batch 1, 286 ms against 74 ms at batch 16, one thread; the static convolution: 2.2 and
37 ms). In eager PyTorch both cost about the same, forward and backward (ResNet18's 3x3 shapes at batch 16, one
thread: within +-30% either way, slices mostly ahead), so every im2col of dynconv uses this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def im2col(x: torch.Tensor, kernel_size, dilation=1, padding=0, stride=1) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*kh*kw, H'*W'), equal to `F.unfold(x, kernel_size, dilation, padding, stride)`."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = (_pair(v) for v in (kernel_size, dilation, padding, stride))
    if (ph, pw) != (0, 0):
        x = F.pad(x, (pw, pw, ph, ph))
    batch, channels, height, width = x.shape
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return x.reshape(batch, channels, height * width)  # one tap, every position: the input itself
    taps = [x[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw]
            for i in range(kh) for j in range(kw)]
    return torch.stack(taps, dim=2).reshape(batch, channels * kh * kw, out_h * out_w)
