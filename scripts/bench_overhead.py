"""Framework overhead: training throughput through dynconv's Trainer (all default hooks on) relative to a
bare forward/backward/step loop of the same model, optimizer and batches, measured in one run.

    python scripts/bench_overhead.py [backbone=resnet18 op=static] [bench.batch=16 bench.resolution=224]

Both loops read the same pre-made in-memory batches (data loading is not what is measured), run
interleaved `bench.repeats` times, and the median is compared. Checkpointing and evaluation happen at
epoch ends, outside the timed steps. The last stdout line is one JSON object; `overhead` = bare
throughput / trainer throughput - 1 (the target is < 0.10).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from dynconv.engine.hooks import Hook  # noqa: E402

DEFAULTS = ["backbone=resnet18", "op=static", "+bench.batch=16", "+bench.resolution=224", "+bench.steps=8",
            "+bench.warmup=2", "+bench.repeats=3"]


def _merge_args(argv: list[str]) -> list[str]:
    given = {arg.split("=", 1)[0].lstrip("+") for arg in argv}
    defaults = [d for d in DEFAULTS if d.split("=", 1)[0].lstrip("+") not in given]
    return defaults + [("+" + a if a.startswith("bench.") else a) for a in argv]


class StepTimer(Hook):
    """Times the optimizer steps only: from the end of the warmup steps to the end of the last step."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total, self.start, self.end = warmup, total, None, None

    def after_step(self, trainer):
        # Synchronise only at the two boundaries, so the timer adds no stall to the steps it times.
        if trainer.batches_done == self.warmup:
            _synchronize(trainer.dist.device)
            self.start = time.perf_counter()
        elif trainer.batches_done == self.total:
            _synchronize(trainer.dist.device)
            self.end = time.perf_counter()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config(argv: list[str]):
    """The composed, validated config of these command-line arguments (exit 2 on a bad one); nothing runs.
    tests/test_docs_commands.py composes every documented command of this script through it."""
    return compose_or_exit("train", _merge_args(argv), validate="model")


def main(argv: list[str]) -> int:
    cfg = config(argv)
    from dynconv.build import build_backbone
    from dynconv.engine.distributed import DistInfo
    from dynconv.engine.trainer import Trainer
    from dynconv.tasks import TASKS
    from dynconv.engine.training_run import build_optimizer_and_scheduler, default_hooks

    bench = cfg.bench
    torch.manual_seed(0)
    steps = bench.warmup + bench.steps
    batches = [(torch.randn(bench.batch, 3, bench.resolution, bench.resolution),
                torch.randint(0, 1000, (bench.batch,)), []) for _ in range(steps)]
    loader = _ListLoader(batches)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    dist = DistInfo(0, 1, 0, device)
    op_cfg = OmegaConf.to_container(cfg.op, resolve=True)
    model = build_backbone(cfg.backbone, op_cfg, cfg.attn, num_classes=1000, image_size=bench.resolution).backbone
    model.to(device)
    task = TASKS.get(cfg.task.name)(cfg.task, cfg.recipe, 1000)
    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg.recipe, len(loader))

    def bare() -> float:
        model.train()
        for index, batch in enumerate(batches):
            if index == bench.warmup:
                _synchronize(device)
                start = time.perf_counter()
            inputs, targets = task.prepare_batch(batch, dist.device, training=True)
            loss = task.loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _synchronize(device)
        return bench.steps * bench.batch / (time.perf_counter() - start)

    def framework(run_dir: Path) -> float:
        trainer = Trainer(model=model, task=task, optimizer=optimizer, scheduler=scheduler, train_loader=loader,
                          train_sampler=loader, val_loader=[], dist=dist, epochs=1,
                          config=OmegaConf.to_container(cfg, resolve=True))
        timer = StepTimer(bench.warmup, steps)
        trainer.register_hooks(default_hooks(cfg, model, scheduler, dist, run_dir) + [timer])
        trainer.train()
        return bench.steps * bench.batch / (timer.end - timer.start)

    bare_rates, framework_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(bench.repeats):
            bare_rates.append(bare())
            framework_rates.append(framework(Path(tmp) / f"run{repeat}"))
            print(f"repeat {repeat + 1}: bare {bare_rates[-1]:.2f} img/s, trainer {framework_rates[-1]:.2f} img/s",
                  flush=True)
    bare_rate, framework_rate = statistics.median(bare_rates), statistics.median(framework_rates)
    overhead = bare_rate / framework_rate - 1
    where = torch.cuda.get_device_name(device) if use_cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"{cfg.backbone.name} {op_cfg['name']} batch {bench.batch} at {bench.resolution}px, {where}: bare {bare_rate:.2f} img/s, trainer {framework_rate:.2f} img/s, "
          f"overhead {100 * overhead:+.1f}%")
    print(json.dumps({"bare_images_per_s": round(bare_rate, 3), "trainer_images_per_s": round(framework_rate, 3),
                      "overhead": round(overhead, 4), "throughput_ratio": round(framework_rate / bare_rate, 4),
                      "batch": bench.batch, "resolution": bench.resolution, "steps": bench.steps,
                      "repeats": bench.repeats, "backbone": cfg.backbone.name, "op": op_cfg["name"],
                      "device": where}))
    return 0


class _ListLoader(list):
    """Pre-made batches standing in for the DataLoader and its sampler (set_epoch/set_start are no-ops)."""

    batch_size = 1

    def set_epoch(self, epoch):
        pass

    def set_start(self, samples):
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
