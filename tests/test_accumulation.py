"""Gradient accumulation (`recipe.accum_steps`) and the cosine schedule's warm restarts (`recipe.cycle_*`).

- One optimizer step over k micro-batches is the step over their concatenation (float64, plain SGD, no
  BatchNorm: nothing else differs), the uneven last micro-batch included; through the real Trainer, on one
  process, with the fp16 GradScaler's path, and under DDP (two gloo ranks, `no_sync` on all but the last).
- `train.py recipe.accum_steps=2` makes half the optimizer steps and reports the effective batch.
- WE Fig. 5b's SGDR (`recipe=we_adamw_sgdr`) restarts at epochs 5, 11 and 18.2 and ends its 4th cycle at 26.84.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from conftest import SMOKE, describe
from dynconv.config import ConfigError, validate_recipe_config
from dynconv.engine.distributed import DistInfo
from dynconv.engine.trainer import Trainer, optimizer_steps_per_epoch
from dynconv.engine.training_run import build_optimizer_and_scheduler
from dynconv.tasks.classification.task import ClassificationTask

FEATURES, CLASSES, LR = 6, 3, 0.5


class _Sampler:
    """What the Trainer asks of a training sampler (dynconv.data.seeded.EpochSampler), for a plain loader."""

    batch_size = 1  # only multiplied by batches_done, which is 0 here

    def set_epoch(self, epoch):
        pass

    def set_start(self, samples):
        assert samples == 0


def _collate(items):
    images, targets = zip(*items)
    return torch.stack(images), torch.stack(targets), []  # (images, targets, skipped paths), as dynconv's loaders


def _data(samples: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(samples, FEATURES, dtype=torch.float64, generator=generator)
    return TensorDataset(images, torch.randint(0, CLASSES, (samples,), generator=generator))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()


def _train(loader, accum_steps: int, dist: DistInfo | None = None, scaler: bool = False) -> Trainer:
    """One epoch of the real Trainer: plain SGD (no momentum, no weight decay), no schedule, no hooks."""
    model = _model()
    recipe = OmegaConf.create({"aug": {}, "smoothing": 0.0})
    trainer = Trainer(model=model, task=ClassificationTask({}, recipe, CLASSES), optimizer=torch.optim.SGD(
        model.parameters(), lr=LR), scheduler=None, train_loader=loader, train_sampler=_Sampler(), val_loader=None,
        dist=dist or DistInfo(0, 1, 0, torch.device("cpu")), epochs=1, config={}, accum_steps=accum_steps)
    if scaler:  # the fp16 path (GradScaler), here on CPU: scaling float64 by a power of two is exact
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.train()
    return trainer


def _micro_loader(dataset, micro: int) -> DataLoader:
    return DataLoader(dataset, batch_size=micro, shuffle=False, collate_fn=_collate)


def _big_loader(dataset, micro: int, accum: int) -> DataLoader:
    """The same images in optimizer-step batches of micro x accum (the epoch's last one smaller)."""
    indices = list(range(len(dataset)))
    steps = [indices[start:start + micro * accum] for start in range(0, len(indices), micro * accum)]
    return DataLoader(dataset, batch_sampler=steps, collate_fn=_collate)


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-12, msg=name)


# samples, micro-batch, accum_steps: one step with a smaller last micro-batch (4+4+2); two steps, the last with
# fewer micro-batches (4+4+4 | 2); four steps of two micro-batches, the last uneven (3+3 | 3+3 | 3+3 | 3+1).
CASES = [(10, 4, 3), (14, 4, 3), (22, 3, 2)]


@pytest.mark.parametrize("samples, micro, accum", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("scaler", [False, True], ids=["fp32-path", "gradscaler-path"])
def test_accumulated_steps_equal_big_batch_steps(samples, micro, accum, scaler):
    dataset = _data(samples)
    accumulated = _train(_micro_loader(dataset, micro), accum, scaler=scaler)
    reference = _train(_big_loader(dataset, micro, accum), 1, scaler=scaler)
    steps = len(_big_loader(dataset, micro, accum))
    assert accumulated.updates_per_epoch == steps == optimizer_steps_per_epoch(-(-samples // micro), accum)
    assert accumulated.global_step == reference.global_step == steps
    assert accumulated.nonfinite.total == 0
    _assert_same_weights(accumulated.model, reference.model)
    # The step's loss is the mean over its images, so the epoch's mean loss is the same too.
    assert accumulated.epoch_loss == pytest.approx(reference.epoch_loss, abs=1e-12)
    assert accumulated.last_batch_size == reference.last_batch_size


def _ddp_rank(rank: int, world: int, init_file: str, samples: int, micro: int, accum: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    syncs = []
    original = DistributedDataParallel.no_sync

    def counting_no_sync(self):
        syncs.append(1)
        return original(self)

    DistributedDataParallel.no_sync = counting_no_sync
    info = DistInfo(rank, world, 0, torch.device("cpu"))
    shard = torch.utils.data.Subset(_data(samples * world), range(rank * samples, (rank + 1) * samples))
    accumulated = _train(_micro_loader(shard, micro), accum, dist=info)
    reference = _train(_big_loader(shard, micro, accum), 1, dist=info)
    DistributedDataParallel.no_sync = original
    differences = [(a - b).abs().max().item() for a, b in zip(accumulated.model.parameters(),
                                                               reference.model.parameters())]
    with open(f"{out}.{rank}", "w") as handle:
        json.dump({"max_difference": max(differences), "no_sync": len(syncs), "steps": accumulated.global_step},
                  handle)
    dist.destroy_process_group()


def test_ddp_accumulation_syncs_once_per_step_and_equals_the_big_batch(tmp_path):
    """Two gloo ranks with 10 images each, micro-batches 4+4+2 in one step: the gradient is all-reduced only in
    the last micro-batch's backward (no_sync twice), and the weights equal a DDP step on the whole batch."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    # fork: the ranks inherit the imported modules instead of importing torch and dynconv again (seconds each).
    mp.start_processes(_ddp_rank, args=(2, str(tmp_path / "init"), 10, 4, 3, out), nprocs=2, join=True,
                       start_method="fork")
    for rank in range(2):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert result["steps"] == 1 and result["no_sync"] == 2, result
        assert result["max_difference"] <= 1e-12, result


def test_train_cli_accum_steps_halves_the_optimizer_steps(run_train, tmp_path):
    """128 images in batches of 32: 4 loader batches, 2 optimizer steps per epoch with accum_steps=2 (one per
    TensorBoard point with log.every=1, and the lr schedule built with them); the effective batch is 64."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    completed, result = run_train([*SMOKE, "op=static", "recipe.epochs=1", "recipe.accum_steps=2", "log.every=1"],
                                  tmp_path)
    assert completed.returncode == 0, describe(completed)
    assert result["run"]["accum_steps"] == 2 and result["run"]["effective_batch"] == 32 * 1 * 2, result
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["global_step"] == (128 // 32) // 2 and last["batches_done"] == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2]
    assert "effective batch 64 = 32 per process x 1 process(es) x 2 micro-batch(es)" in completed.stderr + \
        (tmp_path / "run" / "train.log").read_text()


def test_accum_steps_rule(compose_cfg):
    for value in (0, 1.5, True, "'2'"):
        cfg = compose_cfg([f"recipe.accum_steps={value}"])
        with pytest.raises(ConfigError, match=r"recipe\.accum_steps=.* is invalid; allowed values: integers >= 1"):
            validate_recipe_config(cfg)
    validate_recipe_config(compose_cfg(["recipe.accum_steps=4"]))


# ------------------------------------------------------------------------------------------- warm restarts
def _lrs(cfg, updates_per_epoch: int) -> list[float]:
    optimizer, scheduler = build_optimizer_and_scheduler(nn.Linear(2, 2), cfg.recipe, updates_per_epoch)
    lrs = []
    for step in range(cfg.recipe.epochs * updates_per_epoch + 1):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_we_sgdr_restarts_at_5_11_and_18_2_epochs_and_ends_at_26_84(compose_cfg):
    """WE Fig. 5b: first cycle 5 epochs, x1.2 each, 4 cycles: restarts at 5, 11, 18.2 epochs and the fourth cycle
    ends at 26.84, after which the lr stays at min_lr (0). Every restart returns to the peak lr."""
    cfg = compose_cfg(["recipe=we_adamw_sgdr"])
    validate_recipe_config(cfg)
    per_epoch = 50
    lrs = _lrs(cfg, per_epoch)
    peak = cfg.recipe.lr
    restarts = [step for step in range(1, len(lrs)) if lrs[step] > lrs[step - 1] * 1.5]
    assert [step / per_epoch for step in restarts] == pytest.approx([5, 11, 18.2], abs=1.01 / per_epoch)
    for step in restarts:
        assert lrs[step] == pytest.approx(peak, rel=1e-3)
        assert lrs[step - 1] < peak * 1e-3
    end = 26.84 * per_epoch
    positive = [step for step, lr in enumerate(lrs) if lr > 0]
    assert positive[-1] == pytest.approx(end, abs=1.01)
    assert all(lr == 0 for lr in lrs[math.ceil(end) + 1:])


def test_warm_restarts_are_refused_with_another_schedule(compose_cfg):
    with pytest.raises(ConfigError, match=r"recipe\.cycle_limit=2: warm restarts need recipe\.sched=cosine, not "
                                          r"recipe\.sched=step"):
        validate_recipe_config(compose_cfg(["recipe.sched=step", "recipe.cycle_epochs=5", "recipe.cycle_limit=2"]))
    with pytest.raises(ConfigError, match=r"recipe\.cycle_limit=3 needs recipe\.cycle_epochs"):
        validate_recipe_config(compose_cfg(["recipe.cycle_limit=3"]))
    for override, allowed in (("recipe.cycle_epochs=0", "null or finite numbers > 0"),
                              ("recipe.cycle_mul=0", "finite numbers > 0"),
                              ("recipe.cycle_limit=0", "integers >= 1"),
                              ("recipe.kw_tau_epochs=-1", "finite numbers >= 0")):
        with pytest.raises(ConfigError) as error:
            validate_recipe_config(compose_cfg([override]))
        assert str(error.value) == f"{override} is invalid; allowed values: {allowed}"
