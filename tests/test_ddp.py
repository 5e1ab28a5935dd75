"""Two-process DDP on CPU (gloo) through torchrun: one run, one run directory, world_size in the results."""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf

from conftest import CONDCONV2, SMOKE, describe


def test_torchrun_two_processes_one_run_dir(run_train, tmp_path):
    """`torchrun --standalone --nproc_per_node=2 train.py` without hydra.run.dir: both ranks must agree on one
    run directory (`<backbone>-<op>-<data>/<config hash>` under DYNCONV_OUTPUT_DIR), only rank 0 writes into it,
    and the results report world_size 2.

    Hydra resolves the run dir in every process; a per-process timestamp would give two directories (or
    half-written files from two writers), which is what this guards against.
    """
    outputs = tmp_path / "outputs"
    env = {"DYNCONV_OUTPUT_DIR": str(outputs), "OMP_NUM_THREADS": "1"}
    completed, result = run_train(
        # device=cpu: this is the gloo test, also on a machine with fewer GPUs than processes.
        [*CONDCONV2, *SMOKE, "recipe.epochs=1", "device=cpu"], None, env=env, timeout=400,
        launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    )
    assert completed.returncode == 0, describe(completed)
    assert result is not None, describe(completed)
    assert result["world_size"] == 2
    assert result["epochs"] == 1 and result["status"] == "completed"

    run_dirs = [p.parent for p in outputs.rglob("config.yaml")]
    assert len(run_dirs) == 1, f"expected one run dir, found {run_dirs}"
    run_dir = run_dirs[0]
    assert run_dir.parent == outputs / "resnet18-condconv-digits", run_dir
    top_level = sorted(p.relative_to(outputs).as_posix() for p in outputs.iterdir())
    assert top_level == ["resnet18-condconv-digits"] and len(list(run_dir.parent.iterdir())) == 1
    assert result["run_dir"] == str(run_dir.resolve())
    assert len(list(run_dir.rglob("train.log"))) == 1
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch 1/1") == 1, "more than one rank wrote to train.log"
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert OmegaConf.load(run_dir / "config.yaml").op.experts == 2
    payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert payload["world_size"] == 2
    # 128 samples over 2 ranks at batch 32: 2 steps per rank per epoch (the global batch is 64).
    assert payload["global_step"] == 2
    # Both ranks evaluated disjoint shards whose counts were summed: all 64 validation images, once.
    assert metrics["history_last"]["samples"] == 64
