"""Two exact ways to apply a WeightNet convolution, chosen per layer shape by the one selector.

WeightNet's grouped FC makes each sample's kernel from lambda activations per group (Sec. 3.3): with G' = G*C_out /
C_out groups per output channel, group (o, g) holds the kernel elements of output o over the g-th of G' runs of its
input channels, and

    W'_b[o, part g] = sum_i alpha_b[o, g, i] V_i[o, part g]        (i < lambda)

- "kernels" is the paper's formulation: the grouped FC writes B kernels, then `per_sample_conv2d` (what MAC counting
  evaluates).
- "outputs", by linearity: y_b[o] = sum_{g,i} alpha_b[o, g, i] (V_i[o, part g] * x_b[part g]). The lambda*G'*C_out
  convolutions V_i[o, part g] * x[part g] are ONE static convolution with G' times the layer's groups (each group
  reads one run of input channels), shared by the whole batch; the activations then weight and sum its outputs. It
  costs lambda static convolutions and never builds a kernel: for the release's lambda = 1 it is the static
  convolution's arithmetic at the static convolution's efficiency, where "kernels" writes (and in training keeps for
  the backward) B per-sample kernels. Applies when the runs are whole input channels (G' divides C_in / groups).

Both give the same result up to rounding (tests/test_weightnet.py, float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconv.functional import kernel_capture, recompute, selector
from dynconv.functional.mixture import KERNEL_ELEMENT_COST
from dynconv.functional.per_sample import conv_output_size, per_sample_conv2d

# Cost model: weighting one partial output of "outputs" (written by the convolution, read, weighted and summed,
# and in training the same again for its gradient) costs about as much as this many multiply-accumulates of the
# convolution. Fitted on 2 CPU cores at batch 16 (ResNet18 and MobileNetV2 1.0, 224 px): a 16 -> 96 1x1 layer at
# 112x112 took 29 ms by its kernels and 122 ms by its outputs (38.5M partial outputs for 16 MACs each), while on
# ResNet18's 7x7 stage (4,608 MACs per output) "outputs" took 52 ms against 132 ms.
OUTPUT_ELEMENT_COST = 80


def parts_per_output(layer) -> int | None:
    """G': the grouped FC's groups per output channel, when each covers whole input channels; else None."""
    out_channels, in_per_group = layer.kernel_shape[:2]
    if layer.wn_groups % out_channels:
        return None
    parts = layer.wn_groups // out_channels
    return parts if in_per_group % parts == 0 else None


def by_kernels(x, alpha, generator, bias, layer) -> torch.Tensor:
    """The grouped FC's B kernels, then one per-sample convolution (Sec. 3.3); under `recompute` the backward
    generates them again."""
    bias = None if bias is None else bias.expand(x.shape[0], -1)
    with recompute.materialised(lambda note: note(layer.sample_kernels(alpha, generator)), x, alpha,
                                generator) as kernels:
        return per_sample_conv2d(x, kernels, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def by_outputs(x, alpha, generator, bias, layer) -> torch.Tensor:
    """The lambda*G'*C_out partial convolutions as one static grouped convolution, outputs weighted by alpha."""
    batch = x.shape[0]
    out_channels, in_per_group, kh, kw = layer.kernel_shape
    groups, parts, lam = layer.groups, parts_per_output(layer), layer.lam
    per_group = out_channels // groups
    # generator (C_out*G', lam, C_in/groups/G' * kh * kw), group index o*G' + g -> conv groups (layer group h, part g),
    # each with its outputs (o, i): (h, g, o, i) x (C_in/groups/G', kh, kw).
    weight = generator.view(groups, per_group, parts, lam, in_per_group // parts, kh, kw).transpose(1, 2)
    out = F.conv2d(x, weight.reshape(-1, in_per_group // parts, kh, kw), None, layer.stride, layer.padding,
                   layer.dilation, groups * parts)
    height, width = out.shape[-2:]
    out = out.view(batch, groups, parts, per_group, lam, height, width)
    coefficients = alpha.view(batch, groups, per_group, parts, lam).transpose(2, 3)  # (B, h, g, o, i)
    if parts * lam == 1:
        mixed = out.view(batch, out_channels, height, width) * coefficients.reshape(batch, out_channels, 1, 1)
    else:
        mixed = (out * coefficients[..., None, None]).sum(dim=(2, 4)).reshape(batch, out_channels, height, width)
    return mixed if bias is None else mixed + bias.view(1, -1, 1, 1)


ALGORITHMS = {"kernels": by_kernels, "outputs": by_outputs}


def apply_weightnet_conv(x, alpha, layer) -> torch.Tensor:
    """The layer's output from its activations alpha (B, M*C_out) by the algorithm the selector picks."""
    tensors = (x, alpha, layer.generator, layer.bias)
    if kernel_capture.active():  # analysis: build the kernels, so that per_sample_conv2d records them
        return by_kernels(*tensors, layer)
    return ALGORITHMS[selector.select(WEIGHTNET_CONV, tensors, layer)](*tensors, layer)


class WeightNetRoutine(selector.Routine):
    """A WeightNet convolution for the selector; tensors = (x, alpha, generator, bias), params = the layer. A forced
    per-sample algorithm needs the kernels ("kernels"); the mixture modes mean what they mean for mixtures."""

    name = "weightnet_conv2d"
    makes_kernels = True
    algorithms = tuple(ALGORITHMS)
    canonical = "kernels"  # the paper's formulation, what MAC counting runs
    forced = {"kernels": "kernels", "outputs": "outputs", "fused": "kernels",
              **{name: "kernels" for name in selector.PER_SAMPLE_ALGORITHMS}}
    batch_free = ("outputs", "kernels")  # "kernels" through per_sample_conv2d's batch-independent algorithm

    def applicable(self, algorithm, tensors, layer):
        return algorithm == "kernels" or parts_per_output(layer) is not None

    def cost_model(self, tensors, layer):
        """"kernels" at batch 1 (one plain convolution with the one generated kernel: ResNet18 at 224 px measured
        30 ms against 32-41 ms for the grouped convolution and its weighting, 2 CPU cores); else `export_choice`."""
        return "kernels" if tensors[0].shape[0] == 1 else self.export_choice(tensors, layer)

    def export_choice(self, tensors, layer):
        """Per output element and sample (the batch cancels), with R = C_in/groups * kh * kw multiply-accumulates
        per output: "kernels" costs R plus, spread over the P output positions, the kernel's lambda generating
        products and `KERNEL_ELEMENT_COST` for writing, reading and (training) keeping each of its R elements;
        "outputs" costs lambda * R plus G' * lambda partial outputs to weight and sum (`OUTPUT_ELEMENT_COST`)."""
        if not self.applicable("outputs", tensors, layer):
            return "kernels"
        out_h, out_w = conv_output_size(tensors[0], layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        per_output = layer.kernel_shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
        lam, parts = layer.lam, parts_per_output(layer)
        kernels = per_output + (lam + KERNEL_ELEMENT_COST) * per_output / (out_h * out_w)
        outputs = lam * per_output + parts * lam * OUTPUT_ELEMENT_COST
        return "outputs" if outputs <= kernels else "kernels"

    def macs(self, tensors, layer):
        x = tensors[0]
        out_h, out_w = conv_output_size(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        return x.shape[0] * out_h * out_w * layer.generator.numel() // layer.lam

    def shape_key(self, tensors, layer):
        x, _, generator, bias = tensors
        flags = (f"lam{layer.lam}", f"parts{parts_per_output(layer)}") + (("bias",) if bias is not None else ())
        return selector.conv_shape_key(x, layer.kernel_shape, layer.stride, layer.padding, layer.dilation,
                                       layer.groups, flags)

    def run(self, algorithm, tensors, layer):
        return ALGORITHMS[algorithm](*tensors, layer)


WEIGHTNET_CONV = WeightNetRoutine()
