"""R3D-18: torchvision's 3-D ResNet18 (`torchvision.models.video.r3d_18`; Tran et al., "A Closer Look at
Spatiotemporal Convolutions for Action Recognition", CVPR 2018), Weight Excitation's Mini-Kinetics network (WE Sec.
4.5, Table 6: "R3D-ResNet18", random initialisation, 16 densely sampled frames).

Every convolution is an nn.Conv3d (torchvision's Conv3DSimple subclasses it): the stem's 3 x 7 x 7 (stride 1 x 2 x 2),
the blocks' 3 x 3 x 3 and the 1 x 1 x 1 shortcut projections. Operators that act on Conv3d (Weight Excitation, the
weight reparameterisations) convert them; every other one refuses them with its reason and leaves them static
(docs/video.md). Family `r3d`, placement rules here; no attention add-on has sites in a 3-D network, and
KernelWarehouse would take its generic layout if it could build 3-D cells.

Input: clips (B, 3, T, H, W), any T and side (the network ends in adaptive pooling). MACs at 16 x 112 x 112, the
paper's clips: 40.70 G (torchvision's "GFLOPS" 40.70 are these multiply-accumulates; `torch.utils.flop_counter` counts
81.39 G FLOPs = 2 x MACs).
"""

from __future__ import annotations

import torchvision

from dynconv.backbones.backbone import BACKBONES, FAMILY_RULES, Backbone, PlaceRule
from dynconv.backbones.tsm import video_only_features
from dynconv.knobs import Knobs

# torchvision's VideoResNet naming: stem.0 / layerS.B.convK.0 / layerS.B.downsample.0 / fc.
R3D_RULES = [
    PlaceRule(r"stem\.0", "stem"),
    PlaceRule(r"(layer(\d)\.\d+)\.conv\d\.0", "auto", stage="g2", block_group=1),
    PlaceRule(r"(layer(\d)\.\d+)\.downsample\.0", "downsample", stage="g2", block_group=1),
    PlaceRule(r"fc", "classifier", stage=5),
]
FAMILY_RULES["r3d"] = R3D_RULES

CLIP_FRAMES = 16  # WE Sec. 4.5: "16 densely sampled frames per video"
CLIP_SIDE = 112  # R3D's crop (Tran et al.): the MACs' input side (configs/backbone/r3d_18.yaml)


@BACKBONES.register("r3d_18")
def build_r3d_18(num_classes: int = 400, image_size: int = CLIP_SIDE, drop_rate=None, drop_path_rate=None,
                 zero_init_last: bool | None = None) -> Backbone:
    """`zero_init_last` is torchvision's `zero_init_residual` (each block's last BN scale at 0); None or false keeps
    torchvision's default, 1, which WE's random initialisation is."""
    knobs = Knobs({"drop_rate": drop_rate, "drop_path_rate": drop_path_rate, "zero_init_last": zero_init_last},
                  "backbone", owner="backbone=r3d_18")
    for key in ("drop_rate", "drop_path_rate"):
        if knobs.get(key) not in (None, 0, 0.0):
            raise knobs.fail(key, knobs.get(key), "null or 0 (torchvision's R3D has no dropout or stochastic depth)")
    if zero_init_last is not None:
        knobs.flag("zero_init_last")
    net = torchvision.models.video.r3d_18(weights=None, num_classes=num_classes,
                                          zero_init_residual=bool(zero_init_last))
    return Backbone("r3d_18", net, video_only_features("r3d_18"), [], [], family="r3d",
                    default_resolution=CLIP_SIDE, clip_length=CLIP_FRAMES)
