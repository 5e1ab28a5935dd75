"""`attn=eca`: Efficient Channel Attention (Wang et al., CVPR 2020), timm's `EcaModule`.

The paper's module (equation numbers not cited: the text is not in shared/papers): y = GAP(X);
w = sigmoid(C1D_k(y)), one 1-D convolution across channels with k weights and no bias; out = w . X, in every
block (sites.py). The kernel size is adaptive, k = psi(C) = |log2(C)/gamma + b/gamma|_odd with gamma = 2, b = 1
(the paper's mapping), or fixed with attn.kernel_size. timm computes the same formula and additionally keeps
k >= 3 (which differs from the paper only below C = 8).

Parameter parity: ResNet18 11,689,548 = 11.69M + 36 weights (k = 3, 3, 5 x 6) (KernelWarehouse Table 1: 11.69M).
"""

from __future__ import annotations

from timm.layers import EcaModule

from dynconv.attention import ATTENTIONS
from dynconv.attention.addon import AddOn


def _read(knobs):
    return {
        "kernel_size": knobs.integer("kernel_size", odd=True, nullable=True),
        "gamma": knobs.number("gamma", 0),
        "beta": knobs.number("beta"),
    }


def _make(site, knobs):
    if knobs["kernel_size"] is None:  # timm derives k from `channels` only when they are given
        return EcaModule(site.channels, gamma=knobs["gamma"], beta=knobs["beta"])
    return EcaModule(None, kernel_size=knobs["kernel_size"])


ECA = ATTENTIONS.register("eca")(AddOn(name="eca", knobs=("kernel_size", "gamma", "beta"), read=_read,
                                       kind="blocks", make=_make))
