"""The task seam: what turns a converted backbone into a trainable model and scores it.

A task owns its data, its head, its loss, its batch preparation, its evaluation and its profile; the engine and
the scripts only call these. Each task is one folder of `dynconv/tasks/` (classification: top-1/top-5;
detection: RetinaNet and Mask R-CNN, box and mask AP) that registers its tasks in TASKS and its datasets in
`dynconv.data.DATASETS`.
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
    data_kind = "classification"  # the `DatasetSpec.kind` of the datasets this task can train on

    def __init__(self, cfg: Mapping[str, Any], recipe: Mapping[str, Any], num_classes: int, data: Any = None):
        self.cfg = cfg
        self.recipe = recipe
        self.num_classes = num_classes
        self.data = data  # what build_data returned (the evaluator of a detection task needs its ground truth)

    @classmethod
    def data_names(cls) -> tuple[str, ...]:
        """The data.name values this task can train on."""
        from dynconv.data.datasets import names_for

        return names_for(cls.data_kind)

    @staticmethod
    def build_data(data_cfg: Mapping[str, Any], recipe: Mapping[str, Any], *, rank: int, world_size: int, seed: int):
        """The train/val loaders; returns an object with train_loader, val_loader, train_sampler, num_classes."""
        raise NotImplementedError

    @classmethod
    def build_eval_data(cls, data_cfg: Mapping[str, Any], recipe: Mapping[str, Any], *, rank: int, world_size: int,
                        seed: int):
        """What an evaluation reads (eval.py): an object with val_loader and num_classes. By default the task's
        `build_data`; a task whose validation split stands alone (classification) reads only that split."""
        return cls.build_data(data_cfg, recipe, rank=rank, world_size=world_size, seed=seed)

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

    def input_size(self, data_cfg: Mapping[str, Any]) -> tuple[int, ...]:
        """One input of the model without the batch dimension, (C, H, W) (a video clip: (C, T, H, W)): what eval.py
        counts MACs on. By default the evaluation side: detection's test scale, else the training size."""
        side = int(data_cfg.get("test_size") or data_cfg["image_size"])
        return (3, side, side)

    @classmethod
    def profile(cls, cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """scripts/profile.py's report of the configured model: (readable text, the JSON record). By default
        the backbone as a classifier (params and MACs, trained and folded for inference)."""
        from dynconv.profiling import profile_backbone

        return profile_backbone(cfg)


TASKS: Registry[type[Task]] = Registry("task", "task.name")
