"""Which layers a training-time weight reparameterisation takes: Weight Excitation's and the weight-normalising
ones it is compared with (`dynconv/ops/reparam/`).

Such an operator keeps the backbone's own convolution and puts a `torch.nn.utils.parametrize` parametrization on
its weight, which `dynconv.profiling.fold_for_inference` bakes in for inference: it costs nothing at inference,
so nothing argues for sparing the stem, the shortcuts or the head. WE "modif[ies] all convolution blocks"
(Sec. 4.1), and Table 1 needs the shortcuts (docs/ops/we.md). SE branches (the backbone's and every `attn=`
add-on, role `se`) and the classifier (a Linear) are not convolution blocks and stay as they are.
"""

from __future__ import annotations

import fnmatch

from dynconv.conversion.operator import LayerInfo, Operator


def inputs_per_group(layer: LayerInfo) -> int:
    """In of the paper's Out x In x h x w: the weight's second dimension (1 for a depthwise convolution)."""
    return layer.module.weight.shape[1]


class WeightParametrizationOperator(Operator):
    """Base of the operators that reparameterise convolution weights in place (op=lwe/mwe/we and
    op=weight_std/weight_norm/spectral_norm): every nn.Conv2d / nn.Conv3d but SE branches, the classifier and
    `op.keep_static`."""

    static_roles = frozenset({"se", "classifier"})
    # The layer stays the backbone's own and only its weight is reparameterised, by functions of the weight tensor
    # that read its trailing dimensions as one kernel (WE Sec. 3.2: "t x h x w for 3D"): Conv3d works unchanged.
    supports_conv3d = True

    def refuse(self, layer: LayerInfo) -> str | None:
        # Not Operator.refuse: a weight reparameterisation works with any padding mode, so only place and type.
        if layer.role in self.static_roles:
            return f"role '{layer.role}' is kept static by {self.name}"
        if any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in self.keep_static):
            return "matched op.keep_static"
        if not layer.is_conv:
            return f"{self.name} reparameterises convolution weights only"
        return None
