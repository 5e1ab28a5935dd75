"""OSVAI/ODConv's released checkpoints -> dynconv's `op=odconv` models.

The layout, read from the release's code at revision 0901cc1 (2023-09-06): `modules/odconv.py` (`Attention`,
`ODConv2d`), `models/od_resnet.py`, `models/od_mobilenetv2.py` and `main.py` (`save_checkpoint`, the temperature):

- State: each dynamic layer holds `weight` (n, O, C/g, k, k) and `attention.fc` (a 1x1 convolution without
  bias, (hidden, C, 1, 1)), `attention.bn` (a BatchNorm2d), and the heads `attention.channel_fc`, `filter_fc`
  (not for depth-wise layers), `spatial_fc` (not for 1x1) and `kernel_fc` (not for n = 1), 1x1 convolutions with
  bias. dynconv's `OmniAttention` has the same layers as Linears (`fc`, `bn`, `channel`, `filter`, `spatial`,
  `kernel`): the weights are the same numbers without the two 1x1 dimensions. The static layers keep the names of
  `module_names.py` (the MobileNetV2's are torchvision's: features.*, classifier.1).
- Which layers are dynamic: ResNet: every block convolution, not the stem and not the downsample shortcuts;
  MobileNetV2: every convolution but the stem, the last 1x1 (features.18) included. dynconv's `op=odconv`
  converts the same layers (`dynconv/ops/odconv.py`), so the keys map one to one.
- Not stored: the temperature (`Attention.temperature`, a plain attribute). `main.py` anneals it from 30 to 1
  over `--temp_epoch` epochs and returns before setting it when it only evaluates (`--evaluate`), where it keeps
  its initial 1.0: the release evaluates at T = 1, which the converted checkpoint stores in its temperature
  buffers.
- The checkpoint is `{"state_dict": model.state_dict(), ...}` of the DataParallel / DDP model: "module."-prefixed
  keys (`foreign_checkpoints.state_dict_of` removes the prefix).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from dynconv.config import ConfigError
from dynconv.pretrained.module_names import TO_TIMM
from dynconv.pretrained.reference_layouts.key_mapping import LayoutMismatch, MappedState, Target, map_state

EVALUATION_TEMPERATURE = 1.0
HEADS = {".attention.channel_fc.": ".attention.channel.", ".attention.filter_fc.": ".attention.filter.",
         ".attention.spatial_fc.": ".attention.spatial.", ".attention.kernel_fc.": ".attention.kernel."}
# The release's models (README: ResNet18 / 50 / 101, MobileNetV2 1.0 / 0.75 / 0.5; dynconv has no ResNet101).
MODELS = {"resnet18": "resnet", "resnet50": "resnet", "mobilenetv2_100": "mobilenetv2",
          "mobilenetv2_075": "mobilenetv2", "mobilenetv2_050": "mobilenetv2"}
# The release's Attention as dynconv computes it only with these knobs (they change no key).
REQUIRED_KNOBS = {"attention_function": "softmax"}


class ODConvRelease:
    source = "odconv"
    op = "odconv"
    models = MODELS

    def check_config(self, backbone: str, op_cfg: Mapping[str, Any]) -> None:
        for key, value in REQUIRED_KNOBS.items():
            if op_cfg.get(key, value) != value:
                raise ConfigError(f"op.{key}={op_cfg.get(key)} is invalid for source=odconv: the release's kernel "
                                  f"attention is softmax(z / T); allowed values: {value}")

    def map(self, model: nn.Module, checkpoint: Mapping[str, torch.Tensor], backbone: str, op_cfg: Mapping[str, Any],
            where: str) -> MappedState:
        rename = TO_TIMM[self.models[backbone]]
        kernels = next((value.shape[0] for key, value in checkpoint.items()
                        if key.endswith(".weight") and value.dim() == 5), None)
        if kernels is not None and kernels != op_cfg.get("kernels"):
            raise LayoutMismatch(f"{where}: its ODConv layers have {kernels} kernels each, op.kernels="
                                 f"{op_cfg.get('kernels')}: convert it with op.kernels={kernels}")

        def translate(key: str) -> Target | None:
            timm = rename(key)
            if timm is None:
                return None
            for theirs, ours in HEADS.items():
                timm = timm.replace(theirs, ours)
            return Target(f"net.{timm}")

        def constant(key: str) -> float | None:
            return EVALUATION_TEMPERATURE if key.endswith(".attention.temperature") else None

        return map_state(model.state_dict(), checkpoint, translate, constant, where)

    def classifier_rows(self, checkpoint: Mapping[str, torch.Tensor], backbone: str) -> int | None:
        for key in ("fc.bias", "classifier.1.bias", "classifier.bias"):
            if key in checkpoint:
                return int(checkpoint[key].shape[0])
        return None
