"""`op=static`: the backbone as torchvision/timm define it (the baseline every table compares with)."""

from __future__ import annotations

import torch.nn as nn

from dynconv.conversion.operator import OPERATORS, LayerInfo, Operator


@OPERATORS.register("static")
class StaticOperator(Operator):
    name = "static"
    supports_conv3d = True  # it keeps every layer, 3-D ones too, with its own reason

    def refuse(self, layer: LayerInfo) -> str | None:
        return "op=static keeps every layer"

    def build(self, layer: LayerInfo) -> nn.Module:  # never called: every layer is refused
        return layer.module
