"""Tasks register themselves in TASKS on import."""

from dynconv.tasks import classification, detection  # noqa: F401  (registration)
from dynconv.tasks.base import TASKS, Task

__all__ = ["TASKS", "Task"]
