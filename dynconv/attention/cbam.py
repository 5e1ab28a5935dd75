"""`attn=cbam`: Convolutional Block Attention Module (Woo et al., ECCV 2018), timm's `CbamModule`.

The paper's two sequential attentions (equation numbers not cited: the text is not in shared/papers):
F' = Mc(F) . F with Mc = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))), one shared MLP C -> C/r -> C (ReLU between,
no biases, as the paper writes it); F'' = Ms(F') . F' with Ms = sigmoid(f7x7([AvgPool_c(F'); MaxPool_c(F')])),
where timm's f7x7 is conv + BN (as the authors' release; 2 more parameters). In every block, on its output
before the residual add, as the paper integrates CBAM into a ResNet block (sites.py). r = 16, k = 7.

Parameter parity: ResNet18 11,777,352 (KernelWarehouse Table 1: 11.78M); ResNet50 28,073,576 (WE Table 1: 28.1M).
"""

from __future__ import annotations

from timm.layers.cbam import CbamModule  # not re-exported by timm.layers; cbam.py is a public module

from dynconv.attention import ATTENTIONS
from dynconv.attention.addon import AddOn
from dynconv.attention.sites import squeeze_width


def _read(knobs):
    return {
        "reduction": knobs.integer("reduction"),
        "spatial_kernel_size": knobs.integer("spatial_kernel_size", odd=True),
    }


def _make(site, knobs):
    return CbamModule(site.channels, rd_channels=squeeze_width(site.squeeze_from, knobs["reduction"]),
                      spatial_kernel_size=knobs["spatial_kernel_size"])


CBAM = ATTENTIONS.register("cbam")(AddOn(name="cbam", knobs=("reduction", "spatial_kernel_size"), read=_read,
                                         kind="blocks", make=_make))
