"""The hooks the default training run uses; operators and tasks add their own the same way."""

from dynconv.engine.hooks.base import Hook
from dynconv.engine.hooks.checkpointing import CheckpointHook
from dynconv.engine.hooks.ema import EMAHook
from dynconv.engine.hooks.evaluation import EvalHook
from dynconv.engine.hooks.lr_schedule import LRScheduleHook
from dynconv.engine.hooks.operator_schedule import OperatorScheduleHook
from dynconv.engine.hooks.preemption import PreemptionHook
from dynconv.engine.hooks.progress import ProgressHook
from dynconv.engine.hooks.tensorboard import TensorBoardHook

__all__ = ["Hook", "CheckpointHook", "EMAHook", "EvalHook", "LRScheduleHook", "OperatorScheduleHook",
           "PreemptionHook", "ProgressHook", "TensorBoardHook"]
