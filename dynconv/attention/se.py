"""`attn=se`: Squeeze-and-Excitation (Hu, Shen, Sun, CVPR 2018), timm's `SEModule`.

The SE block (equation numbers not cited: the text is not in shared/papers): z = GAP(U);
s = sigmoid(W2 ReLU(W1 z)), W1: C -> C/r, W2: C/r -> C (fully connected, with biases); out = s . U, in every
block (sites.py). r = 16 (the paper's default).

Parameter parity (1000 classes, 224; tests/test_attention.py): ResNet18 11,778,592 (KernelWarehouse Table 1:
11.78M; WE Table 1: 11.8M); ResNet50 28,088,024 (WE: 28.1M; exactly timm's `seresnet50`); ResNeXt50 27,559,896
(WE: 27.5M, 0.06M off: the paper truncates); MobileNetV2 1.0x 3,605,907 (WE: 3.6M; squeeze width from the block's
input channels, see sites.py; from the mid channels it would be 4.07M). ShuffleNetV2 at WeightNet's widths, 0.5x /
1.5x, with attn.reduction=4 (the SE of the WeightNet authors' group's ShuffleNet code, megvii ShuffleNet-Series
`ShuffleNetV2+/blocks.py` SELayer: C -> C/4 -> C, appended to the end of the main branch, as here): 1,396,672 /
3,894,784 (WeightNet Table 4: 1.4M / 3.9M); with r = 16 they are 1,374,812 / 3,603,436, and 1.5x would not match.
WeightNet Table 4's ResNet50 + SE 26.7M matches no SE variant (r = 32: 26,830,080; see tests/test_attention.py).
MACs: +2.5M on ResNet50 (the MLPs; GAP and rescaling are not counted by dynconv.profiling).
"""

from __future__ import annotations

from timm.layers import SEModule

from dynconv.attention import ATTENTIONS
from dynconv.attention.addon import AddOn
from dynconv.attention.sites import squeeze_width

SE = ATTENTIONS.register("se")(AddOn(
    name="se",
    knobs=("reduction",),
    read=lambda knobs: {"reduction": knobs.integer("reduction")},
    kind="blocks",
    make=lambda site, knobs: SEModule(site.channels, rd_channels=squeeze_width(site.squeeze_from, knobs["reduction"])),
))
