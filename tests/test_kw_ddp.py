"""KernelWarehouse under real DDP: two gloo processes, shared warehouses, one optimizer step.

A warehouse is one parameter read by several layers in one forward; DDP must see it once, reduce its summed
gradient across ranks, and leave every rank with the same cells after the step (the single-process gradient
of the concatenated batch, since DDP averages).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynconv.build import build_backbone
from op_checks import load_op_config


def _model():
    torch.manual_seed(0)
    op = {**load_op_config("kw"), "tau": 0.5}
    return build_backbone({"name": "resnet18"}, op, {"name": "none"}, num_classes=10, image_size=32).backbone.double()


def _batch(rank: int):
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64),
            torch.randint(0, 10, (4,), generator=generator))


def _step(model, images, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        _step(model, *_batch(rank))
        # Parameters only: BN running statistics are per rank by design.
        torch.save({k: v.detach() for k, v in model.module.named_parameters()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_gloo_processes_share_warehouses(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [k for k in states[0] if k.startswith("warehouses.")] == [f"warehouses.stage{s}.cells" for s in range(1, 5)]
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], msg=key)

    # The same step in one process on both ranks' samples: DDP averages the two ranks' gradients, which is the
    # gradient of the mean loss over the concatenated batch only for the parameters; BN statistics are per
    # rank, so compare the warehouses' cells (and their layers' effect) with a tolerance.
    reference = _model()
    (x0, y0), (x1, y1) = _batch(0), _batch(1)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss = (torch.nn.functional.cross_entropy(reference(x0), y0)
            + torch.nn.functional.cross_entropy(reference(x1), y1)) / 2
    loss.backward()
    optimizer.step()
    for stage in range(1, 5):
        key = f"warehouses.stage{stage}.cells"
        torch.testing.assert_close(states[0][key], dict(reference.named_parameters())[key], msg=key)
