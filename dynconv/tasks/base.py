"""The task seam: what turns a converted backbone into a trainable model and scores it.

A task owns its data, its head, its loss, its batch preparation and its evaluation; the engine only calls these.
Classification (top-1/top-5) and detection (RetinaNet, Mask R-CNN: box and mask AP) register into TASKS.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from dynconv.registry import Registry


class Task:
    name = "base"
    primary_metric = "top1"  # the metric that picks best.pt (higher is better)
    find_unused_parameters = False  # DDP: whether some trainable parameters may get no gradient in a step
    data_names: tuple[str, ...] = ()  # the data.name values this task can train on

    def __init__(self, cfg: Mapping[str, Any], recipe: Mapping[str, Any], num_classes: int, data: Any = None):
        self.cfg = cfg
        self.recipe = recipe
        self.num_classes = num_classes
        self.data = data  # what build_data returned (the evaluator of a detection task needs its ground truth)

    @staticmethod
    def build_data(data_cfg: Mapping[str, Any], recipe: Mapping[str, Any], *, rank: int, world_size: int, seed: int):
        """The train/val loaders; returns an object with train_loader, val_loader, train_sampler, num_classes."""
        raise NotImplementedError

    @classmethod
    def validate_config(cls, cfg: Mapping[str, Any], backbone: nn.Module) -> None:
        """Refuse bad task knobs (ValueError naming `task.<key>` and the allowed values) before anything runs;
        `backbone` is the converted backbone, built on the meta device."""

    def build_model(self, backbone: nn.Module) -> nn.Module:
        raise NotImplementedError

    def prepare_batch(self, batch, device: torch.device, training: bool):
        """Move a loader batch to the device (and mix it, for training); returns (inputs, targets)."""
        raise NotImplementedError

    def loss(self, outputs, targets) -> torch.Tensor:
        raise NotImplementedError

    def forward_loss(self, model: nn.Module, inputs, targets) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """One training forward: (loss, images in the batch, extra scalars for the loggers)."""
        return self.loss(model(inputs), targets), inputs.shape[0], {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, autocast, channels_last: bool = False
                 ) -> dict[str, float]:
        raise NotImplementedError

    def result_keys(self) -> list[str]:
        """The metrics that train.py's and eval.py's final JSON line carry."""
        return [self.primary_metric]


TASKS: Registry[type[Task]] = Registry("task", "task.name")
