"""The weight-normalising reparameterisations Weight Excitation is compared with (Quader et al., ECCV 2020,
Sec. 4.2, Table 2 "+WS / +WN / +SN" and Table 4 "ResNet50-GN-WN / -GN-WS"): `op=weight_std`, `op=weight_norm`,
`op=spectral_norm`.

Like WE (`dynconv/ops/we/`), each keeps the backbone's nn.Conv2d and puts a `torch.nn.utils.parametrize`
parametrization on its weight; `dynconv.profiling.fold_for_inference` bakes it in, so the folded model is the
static baseline (parameters, MACs, graph). WS is a pure function of the weight, WN adds g (Out per layer), SN adds
only buffers (u, v).

Which layers: every convolution, as WE's (`placement.py`: the stem, ResNet's shortcuts and MobileNet's head
included; SE branches and the classifier not). WE compares them "for the ResNet50" (Sec. 4.2) with nothing on
placement, so its comparison uses LWE's. WN and SN are defined for any layer; the WS repository replaces every
convolution followed by a normalisation layer, which in the ResNets of WE's tables is every one (a few layers of
other backbones are not: MobileNetV3's conv_head, ConvNeXt's downsampling convs, DeiT's patch embedding;
`op.keep_static` can name them).

Depthwise layers (one input channel per group): reparameterised by default, since each method is defined there
(WS standardises a channel's h x w weights, 9 for a 3 x 3; WN normalises them; SN takes sigma of the Out x hw
matrix). WS's and WN's papers test no depthwise network; WE does not normalise depthwise weights because
"performances deteriorate when weights are normalized in depthwise convolutions" (Sec. 4.1). `op.depthwise=false`
keeps them static. WS refuses a layer with one weight per output channel (In h w = 1): standardising a single
value gives 0.
"""

from __future__ import annotations

import math

import torch.nn as nn

from dynconv.conversion.operator import OPERATORS, LayerInfo
from dynconv.ops.reparam.standardization import WeightStandardization
from dynconv.ops.reparam.torch_norms import normalize_spectrum, normalize_weight
from dynconv.ops.we.parametrize import excite
from dynconv.ops.we.placement import WeightParametrizationOperator, inputs_per_group

DEPTHWISE_REASON = ("one input channel per group (depthwise) and op.depthwise=false (WE Sec. 4.1: normalising "
                    "depthwise weights hurts)")
SINGLE_WEIGHT_REASON = "one weight per output channel: weight standardisation would set it to 0"


class WeightNormalizingOperator(WeightParametrizationOperator):
    """Shared by weight_std / weight_norm / spectral_norm: WE's placement plus the `depthwise` knob."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.depthwise = self.knobs.flag("depthwise")

    def refuse(self, layer: LayerInfo) -> str | None:
        reason = super().refuse(layer)
        if reason is None and not self.depthwise and inputs_per_group(layer) == 1:
            return DEPTHWISE_REASON
        return reason


@OPERATORS.register("weight_std")
class WeightStandardizationOperator(WeightNormalizingOperator):
    """WS (Qiao et al.): each output channel's weights at zero mean, unit std. Knobs: op.eps, op.depthwise."""

    name = "weight_std"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.eps = self.knobs.number("eps", 0)

    def refuse(self, layer: LayerInfo) -> str | None:
        reason = super().refuse(layer)
        if reason is None and math.prod(layer.module.weight.shape[1:]) == 1:
            return SINGLE_WEIGHT_REASON
        return reason

    def build(self, layer: LayerInfo) -> nn.Module:
        return excite(layer.module, WeightStandardization(self.eps))


@OPERATORS.register("weight_norm")
class WeightNormOperator(WeightNormalizingOperator):
    """WN (Salimans & Kingma): w_j = g_j v_j / ||v_j|| per output channel. Knobs: op.depthwise."""

    name = "weight_norm"

    def build(self, layer: LayerInfo) -> nn.Module:
        return normalize_weight(layer.module)


@OPERATORS.register("spectral_norm")
class SpectralNormOperator(WeightNormalizingOperator):
    """SN (Miyato et al.): W / sigma(W), sigma by power iteration. Knobs: op.power_iterations, op.depthwise."""

    name = "spectral_norm"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.power_iterations = self.knobs.integer("power_iterations")

    def build(self, layer: LayerInfo) -> nn.Module:
        return normalize_spectrum(layer.module, self.power_iterations)
