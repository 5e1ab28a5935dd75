"""Weight Excitation (Quader et al., "Weight Excitation: Built-in Attention Mechanisms in Convolutional Neural
Networks", ECCV 2020): `op=lwe`, `op=mwe` and `op=we`.

WE does not replace a convolution: it reparameterises its weight during training (Sec. 3), so that the gradient
reaching each weight is scaled by how important the weight looks (its location: LWE, Eq. 1, `location.py`;
its magnitude: MWE, Eq. 2-3, `magnitude.py`). Each converted layer stays the backbone's own nn.Conv2d with a
`torch.nn.utils.parametrize` parametrization on `weight`; its trainable tensor is
`<layer>.parametrizations.weight.original` (plus LWE's FC_1 / FC_2; `parametrize.py` attaches it so that a
deepcopy of the model folds without touching the original). `dynconv.profiling.fold_for_inference`
(scripts/profile.py's `params_inference`, eval.py, scripts/bench.py's inference timing) removes the
parametrizations with `leave_parametrized=True`: the layers become plain nn.Conv2d holding the excited weights,
and the model has the baseline's parameters, MACs and graph ("no extra computational cost or ConvNet structural
change during inference", Abstract; Table 1's inference columns equal the baselines').

- `op=lwe`: LWE on every convolution that has more than one input channel per group.
- `op=mwe`: MWE on every convolution (Table 2/3/5's ResNet50-MWE; eps_A = 0.1, Sec. 4.2).
- `op=we`: the paper's MobileNetV2-WE (Table 1): LWE on regular convolutions, MWE on depthwise ones, where LWE's
  m is an Out x 1 map that "likely gets absorbed by the following batch normalization" (Sec. 4.2).
  `op.regular=lwe_mwe` puts both on each regular convolution (Table 3's "+LWE+MWE": MWE applied to LWE's
  output), `op.regular=mwe` MWE (then op=we is op=mwe).

Input normalisation: the weight is standardised per output channel before LWE / MWE (end of Sec. 3.3), except in
depthwise convolutions (Sec. 4.1, "performances deteriorate when weights are normalized in depthwise
convolutions"); here: except where a group has one input channel (depthwise, and depthwise with a channel
multiplier), where a channel's only weights are one kernel. `op.standardize=false` feeds W itself everywhere.

Which layers (the paper: "we modify all convolution blocks", Sec. 4.1):
- every nn.Conv2d of the backbone: the stem, the blocks' convolutions, ResNet's downsample shortcuts and
  MobileNet's head. Shortcuts are needed to reproduce Table 1: ResNet50-LWE has 28.1M training parameters; with
  the shortcuts excited it is 28.06M here, without them 27.88M (-> 27.9M). The stem (In = 3) and head change
  the counts by 0.0001M and 0.013M, so the tables cannot decide them; the paper's "all convolution blocks" does.
- not the classifier (a Linear, and ResNet50 + LWE on it would be 28.6M), and not SE branches (role `se`: the
  backbone's own SE and every `attn=` add-on, built after conversion): Table 1's -LWE-SE rows are the -SE model
  plus the -LWE increment (ResNet50-LWE-SE 30.6M = 28.1M + 2.5M).
- op=lwe refuses a layer with one input channel per group (depthwise): the map m is Out x 1, a per-channel
  scale that the next BN absorbs (Sec. 4.2). The layer stays static and the reason is printed once in the
  conversion summary; `op.strict=true` stops instead, naming the layer. op=we / op=mwe excite such layers with
  MWE.

FC_1's width is max(In // r, min_hidden) with r = op.reduction = 16 (Sec. 4.2, "reduction ratio of 16 in LWE").
The paper gives no floor, but In // 16 is 0 for ResNeXt50's grouped 3x3 convolutions (In = 4, 8 per group) and
1 for In = 16..31; `op.min_hidden` = 8 (the floor of timm's SE widths) keeps a real bottleneck there. Table 1
(training / inference parameters, 1000 classes, tests/test_parity_we.py; all inference counts equal the
baselines') with min_hidden = 8: MobileNetV2-LWE 4.11M (paper 4.1), ResNet18-LWE 11.849M (11.9), ResNet50-LWE
28.063M (28.1), ResNeXt50-LWE 27.851M (27.9), WideResNet50-2-LWE 72.337M (72.3), ResNet152-LWE 67.322M (67.3),
ResNet50-LWE-SE 30.594M (30.6), ResNet50-MWE 25.557M (25.6). All are within the paper's rounding (0.05M) but
ResNet18, 0.0507M below 11.9. min_hidden = 1 (no real floor) gives ResNet18 11.846M and ResNeXt50 27.846M, both
0.054M below; 16 pushes WideResNet50-2 to 72.352M and ResNet152 to 67.364M. A floor of 9 to 13 would put every
row within 0.05M, but nothing in the paper points to such a value, so the default stays at the SE convention.
"""

from __future__ import annotations

import torch.nn as nn

from dynconv.conversion.operator import OPERATORS, LayerInfo, OperatorConfigError
from dynconv.ops.we.location import LocationExcitation
from dynconv.ops.we.magnitude import MagnitudeExcitation
from dynconv.ops.we.parametrize import excite
from dynconv.ops.we.placement import WeightParametrizationOperator, inputs_per_group

ONE_INPUT_REASON = ("one input channel per group: LWE's map m would be Out x 1, a per-channel scale the next BN "
                    "absorbs (WE Sec. 4.2); op=we excites these layers with MWE")


class WeightExcitationOperator(WeightParametrizationOperator):
    """Shared by lwe / mwe / we: the knobs they have in common. Which layers are candidates is `placement.py`'s
    rule: WE costs nothing at inference, so the stem and head are excited like every other convolution block;
    SE branches (the backbone's and the attn add-ons') and the classifier are not convolution blocks."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.standardize = self.knobs.flag("standardize")

    def standardizes(self, layer: LayerInfo) -> bool:
        """Standardise the input of WE except in depthwise-like layers (WE Sec. 4.1)."""
        return self.standardize and inputs_per_group(layer) > 1

    def location(self, layer: LayerInfo) -> LocationExcitation:
        fan_in = inputs_per_group(layer)
        hidden = max(fan_in // self.reduction, self.min_hidden)
        return LocationExcitation(fan_in, hidden, self.standardizes(layer))

    def magnitude(self, layer: LayerInfo) -> MagnitudeExcitation:
        return MagnitudeExcitation(self.eps, self.standardizes(layer))

    def _location_knobs(self) -> None:
        self.reduction = self.knobs.integer("reduction")
        self.min_hidden = self.knobs.integer("min_hidden")


@OPERATORS.register("lwe")
class LocationExcitationOperator(WeightExcitationOperator):
    """LWE (Eq. 1) on every convolution with In > 1. Knobs: op.reduction (r), op.min_hidden, op.standardize,
    op.strict (a layer LWE cannot excite stops the run instead of staying static)."""

    name = "lwe"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._location_knobs()
        self.strict = self.knobs.flag("strict")

    def refuse(self, layer: LayerInfo) -> str | None:
        reason = super().refuse(layer)
        if reason is None and inputs_per_group(layer) == 1:
            if self.strict:
                raise OperatorConfigError(
                    f"op.strict=true: op=lwe cannot excite layer '{layer.name}' {layer.shape_str()}: "
                    f"{ONE_INPUT_REASON}; allowed: op.strict=false (leave such layers static), op=we, "
                    f"or op.keep_static=['{layer.name}']")
            return ONE_INPUT_REASON
        return reason

    def build(self, layer: LayerInfo) -> nn.Module:
        return excite(layer.module, self.location(layer))


@OPERATORS.register("mwe")
class MagnitudeExcitationOperator(WeightExcitationOperator):
    """MWE (Eq. 2) on every convolution. Knobs: op.eps (eps_A > 0), op.standardize."""

    name = "mwe"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.eps = self.knobs.number("eps", 0)

    def build(self, layer: LayerInfo) -> nn.Module:
        return excite(layer.module, self.magnitude(layer))


# What op=we puts on a convolution with more than one input channel per group (op.regular).
REGULAR = ("lwe", "lwe_mwe", "mwe")


@OPERATORS.register("we")
class CombinedExcitationOperator(WeightExcitationOperator):
    """MobileNetV2-WE (Table 1): MWE on depthwise (In = 1) convolutions, and on the others what op.regular says:
    `lwe` (the default, Table 1's WE), `lwe_mwe` (Table 3's "+LWE+MWE": MWE applied to LWE's output,
    f_A(m * W_n), see `lwe_then_mwe`) or `mwe` (MWE everywhere, as op=mwe).
    Knobs: op.regular, op.reduction, op.min_hidden, op.eps, op.standardize."""

    name = "we"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.regular = self.knobs.choice("regular", REGULAR)
        self._location_knobs()
        self.eps = self.knobs.number("eps", 0)

    def build(self, layer: LayerInfo) -> nn.Module:
        if inputs_per_group(layer) == 1 or self.regular == "mwe":
            return excite(layer.module, self.magnitude(layer))
        if self.regular == "lwe":
            return excite(layer.module, self.location(layer))
        return self.lwe_then_mwe(layer)

    def lwe_then_mwe(self, layer: LayerInfo) -> nn.Module:
        """W -> f_A(m * W_n): LWE (Eq. 1, on the standardised weight as in Sec. 3.3; W itself with
        op.standardize=false) first, then MWE (Eq. 2) on LWE's output, as a second parametrization in the chain.

        The paper only says that it combined them (Sec. 4.2, 77.09% against LWE's 77.07%). This order keeps each
        method's input what its own section defines: LWE's subnetwork still pools the standardised weight (Eq. 1),
        and MWE, which gives larger gains to a weight with "a relatively larger magnitude among all weights of W"
        (Sec. 3.3), acts on the weights the convolution finally uses. MWE does not standardise again: W_n is
        standardised already, and M_A = (1 + eps_A) max|W| makes f_A scale-equivariant (f_A(c w) = c f_A(w) for
        c > 0), so only m's per-kernel pattern reaches it."""
        excite(layer.module, self.location(layer))
        return excite(layer.module, MagnitudeExcitation(self.eps, standardize=False))
