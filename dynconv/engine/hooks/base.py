"""Hooks around the training loop (detectron2's pattern): each concern is one small object.

The loop calls, in order of the hook list: before_train, then per epoch before_epoch, per step
before_step / after_step, after_epoch, and finally after_train; `close` runs on every path out of training
(also after a stop request or an exception) to release what a hook holds. Hooks read and write the trainer's
public state (epoch, global_step, last_loss, metrics, ...); they never reach into the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dynconv.engine.trainer import Trainer


class Hook:
    def before_train(self, trainer: "Trainer") -> None: ...

    def before_epoch(self, trainer: "Trainer") -> None: ...

    def before_step(self, trainer: "Trainer") -> None: ...

    def after_step(self, trainer: "Trainer") -> None: ...

    def after_epoch(self, trainer: "Trainer") -> None: ...

    def after_train(self, trainer: "Trainer") -> None: ...

    def close(self, trainer: "Trainer") -> None: ...

    # Hooks with state that must survive a resume (e.g. EMA) return it here; it goes in the checkpoint.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
