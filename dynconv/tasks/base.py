"""The task seam: what turns a converted backbone into a trainable model and scores it.

A task owns its head, its loss, its batch preparation and its evaluation; the engine only calls these.
Classification lives here now; RetinaNet and Mask R-CNN register into TASKS with the detection issue.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from dynconv.registry import Registry


class Task:
    name = "base"

    def __init__(self, cfg: Mapping[str, Any], recipe: Mapping[str, Any], num_classes: int):
        self.cfg = cfg
        self.recipe = recipe
        self.num_classes = num_classes

    def build_model(self, backbone: nn.Module) -> nn.Module:
        raise NotImplementedError

    def prepare_batch(self, batch, device: torch.device, training: bool):
        """Move a loader batch to the device (and mix it, for training); returns (inputs, targets)."""
        raise NotImplementedError

    def loss(self, outputs, targets) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, autocast) -> dict[str, float]:
        raise NotImplementedError


TASKS: Registry[type[Task]] = Registry("task", "task.name")
