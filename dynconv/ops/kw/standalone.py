"""KernelWarehouse as one drop-in layer: `KWConv2d(16, 32, 3, padding=1)` with a warehouse of its own.

In a network, op=kw plans warehouses shared by a stage's layers (`operator.py`). A layer built on its own gets the
plan of a network of one layer: the generic layout, whose warehouse then holds this layer's cells only, at the
budget and with the attention configs/op/kw.yaml gives (its defaults, or the knobs passed). The plan is op=kw's
own (`prepare` and `build` on a one-layer description), so the layer is exactly the one the operator would build
for this shape; cross-layer sharing, KernelWarehouse's point, needs the operator on a whole network
(`dynconv.convert(model, op="kw")`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch.nn as nn

from dynconv.conversion.layer import LayerInfo


def standalone_parts(in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                     **knobs: Any):
    """(partition, attention, warehouse) of a lone KernelWarehouse convolution of this geometry; `knobs` are
    op=kw's (validated as the configs are: a ConfigError names a wrong one)."""
    from dynconv.build import make_operator
    from dynconv.config import ConfigError
    from dynconv.conversion.op_config import op_config
    from dynconv.conversion.operator import OperatorConfigError

    operator = make_operator(op_config("kw", **knobs))
    # Only its shape is read: on the meta device it allocates nothing.
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False,
                     device="meta")
    layer = LayerInfo("conv", conv, "conv", 1, None, 0)
    network = SimpleNamespace(family="generic", name="KWConv2d", warehouses={})
    try:  # a knob valid alone that does not fit this layer (a budget the layout refuses): a config error too
        operator.prepare(network, [layer])
    except OperatorConfigError as error:
        raise ConfigError(str(error)) from None
    reason = operator.refuse(layer)
    if reason is not None:
        raise ValueError(f"KernelWarehouse cannot build a {layer.shape_str()} layer: {reason}")
    built = operator.build(layer)
    return built.partition, built.attention, built.__dict__["warehouse"]
