"""Process-group setup for torchrun (env://) and SLURM/submitit; helpers that are no-ops on one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group if launched by torchrun or submitit; pick the device for this rank.

    `timeout_s` bounds every collective (`dist.timeout_s`): a rank that died or hangs makes the others fail with
    an error after at most that long instead of waiting forever (gloo also fails at once when a peer's connection
    closes; NCCL aborts the communicator on timeout, torch's default error handling)."""
    if "SUBMITIT_EXECUTOR" in os.environ and "RANK" not in os.environ:
        import submitit

        # Exports MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from SLURM's variables for env://.
        submitit.helpers.TorchDistributedEnvironment().export()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: start at "
                "most one process per GPU (torchrun --nproc_per_node), or pass device=cpu to train on the CPU (gloo)"
            )
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        from datetime import timedelta

        timeout = timedelta(seconds=float(timeout_s)) if timeout_s else None
        dist.init_process_group(backend=chosen, init_method="env://", timeout=timeout)
    return DistInfo(rank, world_size, local_rank, torch_device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks stop at the same step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
