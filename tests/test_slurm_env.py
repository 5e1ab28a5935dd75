"""The SLURM/submitit path of `init_distributed`: two processes that look like two SLURM tasks of one job
(as hydra-submitit-launcher starts them) join one gloo process group through
`submitit.helpers.TorchDistributedEnvironment`, with no torchrun variables set."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, torch
import os
from dynconv.engine.distributed import all_reduce_sum, cleanup_distributed, init_distributed
info = init_distributed("cpu")
total = all_reduce_sum(torch.tensor([float(info.rank + 1)]))
print(json.dumps({"procid": int(os.environ["SLURM_PROCID"]), "rank": info.rank, "world_size": info.world_size,
                  "sum": total.item()}))
cleanup_distributed()
"""


def test_two_slurm_tasks_join_one_process_group(tmp_path):
    job_id = str(random.randint(100000, 999999))  # submitit derives the rendezvous port from the job id
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID=job_id, SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost",
               SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    procs = []
    for task in range(2):
        task_env = dict(env, SLURM_PROCID=str(task), SLURM_LOCALID=str(task))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=task_env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["rank"] == r["procid"] for r in results)  # the rank comes from SLURM_PROCID
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in results)  # 1 + 2 summed across tasks
