"""Tasks, one folder each (`classification/`, `detection/`): a task package registers its tasks in TASKS and
its datasets in `dynconv.data.DATASETS` when imported, and every package here is imported below, so a new task
is one new folder (and its configs)."""

from dynconv.registry import import_submodules
from dynconv.tasks.base import TASKS, Task

import_submodules(__name__)

__all__ = ["TASKS", "Task"]
