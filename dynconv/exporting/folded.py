"""The folded format: a model whose dynconv layers are all training-time reparameterisations (Weight Excitation,
WS / WN / SN) is, once they are folded into plain weights, the backbone's own library network, and its state
dict loads into `timm.create_model(<name>, num_classes=...)` (or the torchvision constructor) with nothing of
dynconv installed. A dynamic layer (a kernel computed from each input) has no such static twin: it is refused,
by name."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

import torch.nn as nn

from dynconv.exporting.errors import ExportError
from dynconv.profiling import fold_for_inference

# torchvision's ShuffleNetV2 constructors, for the backbones built from them at torchvision's widths.
_TORCHVISION_SHUFFLENET = re.compile(r"shufflenetv2_x(\d)_(\d)")


@dataclass
class LibraryModel:
    """How the plain network is built without dynconv: `library.constructor(**kwargs)`."""

    library: str  # "timm" | "torchvision"
    constructor: str  # timm.create_model's name, or the torchvision.models function
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        if self.library == "timm":
            import timm

            return timm.create_model(self.constructor, pretrained=False, **self.kwargs)
        return getattr(importlib.import_module("torchvision.models"), self.constructor)(**self.kwargs)

    def load_snippet(self, path: str) -> str:
        arguments = ", ".join([*([repr(self.constructor)] if self.library == "timm" else []),
                               *(f"{key}={value!r}" for key, value in self.kwargs.items())])
        build = (f"timm.create_model({arguments})" if self.library == "timm"
                 else f"torchvision.models.{self.constructor}({arguments})")
        return f"{build}.load_state_dict(torch.load({path!r}, weights_only=True))"


def plain_network(model: nn.Module) -> tuple[nn.Module, LibraryModel]:
    """The folded library network of `model` (a dynconv `Backbone`, or a plain network), and how to build it.
    Raises ExportError naming the first layer that is not the library's own."""
    folded = fold_for_inference(model)
    net = getattr(folded, "net", folded)
    prefix = "net." if net is not folded else ""
    for name, module in net.named_modules():
        if type(module).__module__.startswith("dynconv."):
            raise ExportError("folded", _not_foldable(module), f"{prefix}{name}", type(module).__name__)
    return net, library_model(model, net)


def _not_foldable(module: nn.Module) -> str:
    if hasattr(module, "kernel_size") or hasattr(module, "in_features"):
        kind = "its kernel is computed from each input (a dynamic layer), so no static weight can hold it"
    else:
        kind = "the plain library network has no such module"
    return (f"a dynconv {type(module).__name__}: {kind}. Only training-time reparameterisations (op=we, lwe, mwe, "
            f"weight_std, weight_norm, spectral_norm) fold into a plain model; export dynamic operators with "
            f"format=onnx or format=torch_export")


def library_model(model: nn.Module, net: nn.Module) -> LibraryModel:
    """The library constructor of `net`: timm's architecture name (its `pretrained_cfg`), or torchvision's
    ShuffleNetV2 at its own widths; ExportError for any other network."""
    num_classes = _num_classes(model, net)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if type(net).__module__.startswith("timm."):
        architecture = (getattr(net, "pretrained_cfg", None) or {}).get("architecture")
        if architecture:
            return LibraryModel("timm", architecture, kwargs)
    backbone = getattr(model, "name", "")
    widths = _TORCHVISION_SHUFFLENET.fullmatch(str(backbone))
    if type(net).__module__.startswith("torchvision.") and widths:
        return LibraryModel("torchvision", f"shufflenet_v2_x{widths[1]}_{widths[2]}", kwargs)
    raise ExportError("folded", f"no timm or torchvision constructor builds {type(net).__name__} "
                      f"(backbone {backbone or 'unknown'}); the folded format covers timm backbones and "
                      "torchvision's ShuffleNetV2 widths")


def _num_classes(model: nn.Module, net: nn.Module) -> int | None:
    config = getattr(model, "dynconv_config", None) or {}
    value = config.get("num_classes") or getattr(net, "num_classes", None)
    return None if value is None else int(value)
