"""The CIFAR-100 networks of Weight Excitation (Quader et al., ECCV 2020) Sec. 4.3 / Table 6: VGG19 (BN) and
ResNeXt-29 16x64d, for 32x32 inputs. Table 6, CIFAR-100 top-1: VGG19 73.2% -> 73.8% with LWE, ResNeXt-29 16x64d
80.5% -> 81.5% (`configs/experiment/vgg19_lwe_cifar100.yaml`, `resnext29_16x64d_lwe_cifar100.yaml`).

The paper trains them with the recipe of bearpaw/pytorch-classification (`recipe=cifar100`), so both follow the
CIFAR definitions of that code base; neither is in timm or torchvision, so they are assembled here from
torchvision's building blocks.

- `vgg19_cifar`: torchvision's VGG feature extractor for configuration "E" (Simonyan & Zisserman 2015) with BN:
  sixteen 3x3 convolutions (with bias) + BN + ReLU in five stages of 64, 128, 256, 512, 512 channels, each ended
  by a 2x2 max-pool, so a 32 px input leaves a 1x1x512 map; the classifier is a single Linear(512, classes).
  An adaptive average pool replaces the usual flatten: at 32 px it is the identity (a 1x1 map), elsewhere it lets
  the network run at other resolutions (the feature test at 64 px). The convolutions keep torchvision's (and
  bearpaw's) bias although a BN follows: it is part of the usual count (5,504 parameters), and it is why
  op=odconv, which has no bias, leaves every VGG layer static. Measured (scripts/profile.py, 100 classes,
  32x32): 20,086,692 parameters (the common count of the CIFAR VGG19-BN), 398.2M MACs; op=lwe 20,360,351
  training parameters (527.1M MACs with the weight generation), folded back to 20,086,692 for inference.
- `resnext29_16x64d`: ResNeXt-29 (Xie et al., CVPR 2017, Sec. 5.3 and Table 7): a 3x3 stem of 64 channels (no
  max-pool), three stages of three bottleneck blocks (29 = 9 blocks x 3 layers + stem + classifier), cardinality
  16 with 64 channels per group in the first stage (grouped 3x3 width 1024, 2048, 4096), outputs 256, 512, 1024
  at strides 1, 2, 2 (the stride on the grouped 3x3, as in the reference Torch code), a 1x1 projection shortcut
  where the shape changes, global average pooling and Linear(1024, classes). The blocks are torchvision's
  `Bottleneck` (width = planes x base_width / 64 x groups), and the names follow torchvision's ResNet
  (conv1 / layerS.B.convK / layerS.B.downsample.0 / fc), so timm_backbones.RESNET_RULES place its layers.
  Measured: 68,247,460 parameters for 100 classes and 68,155,210 for 10 (ResNeXt Table 7 gives one "68.1M" for
  both CIFARs: the 10-class count is 0.055M above it, the 100-class head adds 92,250), 10.69G MACs at 32x32.
  op=lwe: 76,996,751 training parameters (LWE's FC_1/FC_2 add 8.75M, 6.66M of them in layer3 whose layers have
  In = 1024..4096; 19.57G MACs with the weight generation), 68,247,460 once folded for inference.

Multi-scale features (`forward_features`): VGG19 gives C2..C5, the outputs of the max-pools at strides 4, 8,
16 and 32 (after the pool, so that every stride up to 32 exists: before the pools the strides would be 1..16).
ResNeXt-29 downsamples by 4 in all (stem and layer1 at stride 1), so its maps are the outputs of layer1..layer3
at strides 1, 2 and 4, keyed C0, C1, C2 (Backbone's log2 naming); a neck that expects strides 4..32 cannot use it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models.resnet as tv_resnet
import torchvision.models.vgg as tv_vgg

from dynconv.backbones.backbone import BACKBONES, Backbone, PlaceRule

VGG19_CFG = tv_vgg.cfgs["E"]  # 64,64,M,128,128,M,256x4,M,512x4,M,512x4,M


# ------------------------------------------------------------------------------------------------------ VGG19
def vgg_rules(cfg: list) -> list[PlaceRule]:
    """One rule per convolution of torchvision's flat `features` Sequential: the stage is the number of
    max-pools before it, plus one. A VGG convolution belongs to no block (nothing groups layers that read the
    same input), so operators with block-wise routing condition these layers one by one."""
    rules, index, stage = [], 0, 1
    for entry in cfg:
        if entry == "M":
            index, stage = index + 1, stage + 1
            continue
        rules.append(PlaceRule(rf"features\.{index}", "stem" if index == 0 else "auto", stage=stage))
        index += 3  # conv, BN, ReLU
    # With backbone.drop_rate the classifier is Sequential(Dropout, Linear).
    rules.append(PlaceRule(r"classifier(\.1)?", "classifier", stage=stage))
    return rules


def _pool_indices(features: nn.Sequential) -> list[int]:
    return [i for i, module in enumerate(features) if isinstance(module, nn.MaxPool2d)]


def vgg_features(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """After the max-pools of stages 2..5: strides 4, 8, 16, 32."""
    keep = set(_pool_indices(net.features)[1:])
    maps = []
    for index, module in enumerate(net.features):
        x = module(x)
        if index in keep:
            maps.append(x)
    return maps


def build_vgg19_cifar(num_classes: int = 100, image_size: int = 32, drop_rate=None, drop_path_rate=None) -> Backbone:
    # torchvision's VGG, with its ImageNet head (7x7 pool, three Linear layers) swapped for CIFAR's.
    net = tv_vgg.VGG(tv_vgg.make_layers(VGG19_CFG, batch_norm=True), num_classes=num_classes)
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    classifier = nn.Linear(512, num_classes)
    nn.init.normal_(classifier.weight, 0, 0.01)  # torchvision's (and bearpaw's) VGG initialisation
    nn.init.zeros_(classifier.bias)
    net.classifier = nn.Sequential(nn.Dropout(drop_rate), classifier) if drop_rate else classifier
    # drop_path_rate: VGG has no residual branch to drop.
    channels = [VGG19_CFG[i - 1] for i, entry in enumerate(VGG19_CFG) if entry == "M"][1:]  # width before each pool
    return Backbone("vgg19_cifar", net, vgg_features, channels, [4, 8, 16, 32], family="vgg",
                    rules=vgg_rules(VGG19_CFG), default_resolution=32)


# -------------------------------------------------------------------------------------------------- ResNeXt-29
class CifarResNeXt(nn.Module):
    """ResNeXt for 32x32 inputs (Xie et al. 2017, Sec. 5.3): 3x3 stem, three stages of torchvision Bottlenecks."""

    def __init__(self, blocks_per_stage: int = 3, cardinality: int = 16, base_width: int = 64,
                 num_classes: int = 100, drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = drop_rate
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # planes 64/128/256: grouped width planes x base_width / 64 x cardinality, output planes x 4.
        self.layer1 = self._make_layer(64, blocks_per_stage, 1, cardinality, base_width)
        self.layer2 = self._make_layer(128, blocks_per_stage, 2, cardinality, base_width)
        self.layer3 = self._make_layer(256, blocks_per_stage, 2, cardinality, base_width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        for module in self.modules():  # He init (fan_out), as the reference Torch code and torchvision
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int, groups: int, base_width: int) -> nn.Sequential:
        out = planes * tv_resnet.Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:  # projection shortcut only where the shape changes
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        layers = [tv_resnet.Bottleneck(self.inplanes, planes, stride, downsample, groups, base_width)]
        self.inplanes = out
        layers += [tv_resnet.Bottleneck(out, planes, groups=groups, base_width=base_width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.layer1(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(c1)
        return [c1, c2, self.layer3(c2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.stages(x)[-1]), 1)
        if self.drop_rate:  # applied functionally (as timm's ResNet) so the classifier keeps the name `fc`
            x = F.dropout(x, self.drop_rate, self.training)
        return self.fc(x)


def build_resnext29_16x64d(num_classes: int = 100, image_size: int = 32, drop_rate=None,
                           drop_path_rate=None) -> Backbone:
    # drop_path_rate: not supported by these blocks (the paper uses none), as for torchvision's backbones.
    net = CifarResNeXt(3, cardinality=16, base_width=64, num_classes=num_classes, drop_rate=drop_rate or 0.0)
    # Family "resnet": torchvision's ResNet names, so ResNet's placement rules and KernelWarehouse layout apply.
    return Backbone("resnext29_16x64d", net, lambda model, x: model.stages(x), [256, 512, 1024], [1, 2, 4],
                    family="resnet", default_resolution=32)


BACKBONES.register("vgg19_cifar")(build_vgg19_cifar)
BACKBONES.register("resnext29_16x64d")(build_resnext29_16x64d)
