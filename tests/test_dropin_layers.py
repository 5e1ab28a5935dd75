"""Every operator's layer class is a drop-in for nn.Conv2d: nn.Conv2d's arguments, its output shape, at batch 1 and 4,
with a backward pass reaching every parameter, and its knobs' defaults those of configs/op/<name>.yaml."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

from op_checks import load_op_config

from dynconv.functional import selector
from dynconv.ops.cgc import CGCConv2d
from dynconv.ops.condconv import CondConv2d
from dynconv.ops.dcd import DCDConv2d
from dynconv.ops.dyconv import DyConv2d
from dynconv.ops.dynet.operator import DyNetConv2d
from dynconv.ops.kw.layers import KWConv2d
from dynconv.ops.odconv import ODConv2d
from dynconv.ops.sk import SKConv2d
from dynconv.ops.weightnet import WeightNetConv2d

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small layers, shared cores

# op= name -> its layer class (the weight reparameterisations and Weight Excitation keep nn.Conv2d itself).
LAYERS = {"condconv": CondConv2d, "dyconv": DyConv2d, "odconv": ODConv2d, "sk": SKConv2d,
          "weightnet": WeightNetConv2d, "dynet": DyNetConv2d, "kw": KWConv2d, "cgc": CGCConv2d, "dcd": DCDConv2d}
# nn.Conv2d's positional arguments: in, out, kernel_size, stride, padding, dilation, groups.
GEOMETRIES = {
    "3x3": (8, 16, 3, 1, 1, 1, 1),
    "3x3-stride2": (8, 16, 3, 2, 1, 1, 1),
    "1x1": (8, 16, 1, 1, 0, 1, 1),
    "3x3-dilation2": (8, 16, 3, 1, 2, 2, 1),
    "depthwise": (8, 8, 3, 1, 1, 1, 8),
    "grouped-5x5-stride2": (8, 16, 5, 2, 2, 1, 2),
}
# Shapes a layer does not take, with the reason its constructor gives.
REFUSED = {("dcd", "depthwise"): "groups=1", ("dcd", "grouped-5x5-stride2"): "groups=1",
           ("cgc", "1x1"): "CGC gates k x k kernels"}
# Knobs whose class default stands for the config's symbolic one: dynet's `auto` reduction is the network's own,
# else 1/4, and a lone layer has no network.
SYMBOLIC = {("dynet", "reduction")}


def _case(op: str, geometry: str):
    marks = [pytest.mark.xfail(strict=True, raises=ValueError, reason=REFUSED[op, geometry])] \
        if (op, geometry) in REFUSED else []
    return pytest.param(op, geometry, marks=marks, id=f"{op}-{geometry}")


@pytest.mark.parametrize(("op", "geometry"), [_case(op, g) for op in LAYERS for g in GEOMETRIES])
def test_layer_is_a_drop_in_for_nn_conv2d(op, geometry):
    """Built from nn.Conv2d's positional arguments alone, the layer maps a batch of 1 and of 4 to nn.Conv2d's output
    shape, in train and eval mode, and one backward pass gives every parameter a finite gradient."""
    torch.manual_seed(0)
    args = GEOMETRIES[geometry]
    layer = LAYERS[op](*args)
    reference = nn.Conv2d(*args)
    with selector.policy("model"):
        for batch in (1, 4):
            x = torch.randn(batch, args[0], 9, 9)
            layer.train()
            out = layer(x)
            assert out.shape == reference(x).shape
            layer.zero_grad()
            out.square().mean().backward()
            for name, param in layer.named_parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), f"{op}: {name}"
            layer.eval()
            with torch.no_grad():
                assert layer(x).shape == reference(x).shape


@pytest.mark.parametrize("op", ["odconv", "sk"])
def test_layers_without_a_bias_refuse_one(op):
    """nn.Conv2d's `bias` argument is taken; ODConv (a BatchNorm follows it) and SK (paths end in BatchNorms) have
    no bias to give, and say so instead of dropping it."""
    assert LAYERS[op](8, 16, 3, 1, 1, bias=False) is not None
    with pytest.raises(ValueError, match="bias"):
        LAYERS[op](8, 16, 3, 1, 1, bias=True)


def test_layers_with_a_bias_keep_nn_conv2ds_default():
    """CGC and DCD keep a static kernel and bias as nn.Conv2d does (bias=True by default); from_conv shares an existing
    convolution's parameters."""
    conv = nn.Conv2d(8, 16, 3, padding=1)
    for cls in (CGCConv2d, DCDConv2d):
        assert cls(8, 16, 3, padding=1).bias is not None
    assert CGCConv2d.from_conv(conv).weight is conv.weight
    assert DCDConv2d.from_conv(conv, latent=4, hidden=8, pool=2).bias is conv.bias


def test_standalone_kw_layer_owns_its_warehouse():
    """A KWConv2d built alone registers its warehouse as a child (saved, moved, optimised with the layer) and takes
    op=kw's knobs; a wrong knob names the key and the allowed values."""
    from dynconv.config import ConfigError

    layer = KWConv2d(8, 16, 3, padding=1, b=2)
    assert "warehouse.cells" in layer.state_dict()
    assert layer.warehouse.cells.shape[0] > KWConv2d(8, 16, 3, padding=1).warehouse.cells.shape[0]  # b = 2 > 1
    with pytest.raises(ConfigError, match=r"op.b=3/5 is invalid"):
        KWConv2d(8, 16, 3, b="3/5")


def _default(parameter: inspect.Parameter):
    value = parameter.default
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("op", [op for op in LAYERS if op != "kw"])
def test_layer_defaults_are_the_configs(op):
    """A knob the layer's constructor shares with configs/op/<op>.yaml defaults to the YAML's value (the temperature
    schedule to temperature_start/end/epochs): the layer alone behaves as the operator does out of the box. (KWConv2d
    reads its knobs from the YAML itself.)"""
    config = load_op_config(op)
    parameters = inspect.signature(LAYERS[op]).parameters
    shared = [key for key in parameters if key in config and (op, key) not in SYMBOLIC]
    assert shared, f"{op}: no knob in common with its config"
    for key in shared:
        assert _default(parameters[key]) == config[key], f"{op}: {key}"
    if "schedule" in parameters:
        schedule = parameters["schedule"].default
        assert (schedule.start, schedule.end, schedule.epochs) == \
               (config["temperature_start"], config["temperature_end"], config["temperature_epochs"])
