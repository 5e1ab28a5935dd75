"""Chaos campaign: kill -9 a training at random moments, rerun the same command, and demand the uninterrupted result.

    python scripts/chaos.py                      # 10 kills (defaults in configs/chaos.yaml)
    python scripts/chaos.py kills=3 seed=1 keep=true out=/tmp/chaos

1. A reference run of the training (configs/chaos.yaml `train`: digits, `deterministic=true`) runs uninterrupted.
2. The same command is started again in another output root and killed with SIGKILL `kills` times: the first kill
   half-way through a checkpoint write, the second during evaluation, the others at a random training step among
   those the run has left (drawn with `seed`; a wall-clock moment would miss the run on a machine whose load
   changes, and a finished run cannot be killed). Each is a self-SIGKILL by DYNCONV_FAULTS at that moment
   (dynconv/engine/faults.py): no handler, no flush, indistinguishable from `kill -9` by anyone else.
   Only the main process is killed, as the OOM killer or `kill -9 <pid>` would; its DataLoader workers must exit
   by themselves (they watch their parent). After each kill, the run folder must hold a loadable checkpoint once
   one epoch has finished, and at most one epoch of work may be redone.
3. The same command then runs to the end; its final weights (`last.pt`'s model) and metrics must be bitwise equal
   to the reference's.

The last stdout line is one JSON object: kills_tried, kills_survived, bitwise_equal, max_epochs_redone,
orphaned_workers, restarts, and per kill what happened.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)

TARGETED = ("checkpoint_write", "eval")  # the first kills land here (the moments a random kill rarely hits)
FAULTS = {"checkpoint_write": "kill@checkpoint_write=1", "eval": "kill@eval_batch=1"}
EPOCH_LINE = re.compile(r"\bepoch (\d+)/\d+: ")
ORPHAN_WAIT_S = 15.0  # DataLoader workers poll their parent every 5 s


def config(argv: list[str]):
    return compose_or_exit("chaos", argv, validate="none")


class Campaign:
    def __init__(self, cfg, work: Path):
        self.cfg = cfg
        self.work = work
        self.command = [sys.executable, str(REPO / "train.py"), *map(str, cfg.train)]
        self.rng = random.Random(int(cfg.seed))

    def env(self, output_root: Path, faults: str | None = None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("DYNCONV_FAULTS", "DYNCONV_RUN"))}
        env["DYNCONV_OUTPUT_DIR"] = str(output_root)
        env.setdefault("DYNCONV_DATA_DIR", str(self.work / "data"))
        if faults:
            env["DYNCONV_FAULTS"] = faults
        return env

    def start(self, output_root: Path, log_name: str, faults: str | None = None) -> subprocess.Popen:
        log = open(self.work / f"{log_name}.log", "w")
        # A session of its own: the leftovers of a killed attempt (its workers) are found by process group.
        return subprocess.Popen(self.command, cwd=REPO, env=self.env(output_root, faults), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self, process: subprocess.Popen, log_name: str) -> dict:
        process.wait(timeout=float(self.cfg.attempt_timeout_s))
        text = (self.work / f"{log_name}.log").read_text()
        if process.returncode != 0:
            raise RuntimeError(f"{log_name} exited with {process.returncode}:\n{text[-3000:]}")
        return json.loads(text.strip().splitlines()[-1])


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def reap_group(pgid: int) -> int:
    """Wait for a killed attempt's remaining processes (its workers) to exit by themselves; kill and count the rest."""
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not group_alive(pgid):
        return 0
    left = sum(1 for pid in os.listdir("/proc") if pid.isdigit() and _pgid(int(pid)) == pgid)
    os.killpg(pgid, signal.SIGKILL)
    return left


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def checkpoint_state(run_dir: Path) -> tuple[int | None, bool]:
    """(epoch of the newest loadable full state, whether any checkpoint file exists)."""
    from dynconv.engine.checkpoint import find_resumable

    directory = run_dir / "checkpoints"
    path, payload, _ = find_resumable(directory)
    exists = any((directory / name).is_file() for name in ("last.pt", "previous.pt"))
    return (int(payload["epoch"]) if payload is not None else None), exists


def _checkpoint_steps(run_dir: Path) -> int:
    from dynconv.engine.checkpoint import find_resumable

    _, payload, _ = find_resumable(run_dir / "checkpoints")
    return int(payload["global_step"]) if payload is not None else 0


def epochs_logged(log_text: str) -> int:
    """The highest epoch whose evaluation this attempt logged (0 if none)."""
    return max((int(m.group(1)) for m in EPOCH_LINE.finditer(log_text)), default=0)


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(cfg) -> dict:
    import torch

    work = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="dynconv-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(cfg, work)
    started = time.perf_counter()

    reference_start = time.perf_counter()
    reference = campaign.finish(campaign.start(work / "reference", "reference"), "reference")
    reference_s = time.perf_counter() - reference_start
    reference_dir = Path(reference["run_dir"])
    total_steps = int(torch.load(reference_dir / "checkpoints" / "last.pt", weights_only=True)["global_step"])

    kills = []
    orphans = 0
    chaos_root = work / "chaos"
    run_dir = None
    done_steps = 0  # global steps in the newest loadable checkpoint
    for index in range(int(cfg.kills)):
        moment = TARGETED[index] if index < len(TARGETED) else "random"
        name = f"attempt{index + 1}"
        step = campaign.rng.randint(done_steps + 1, total_steps) if moment == "random" else None
        faults = FAULTS.get(moment) or f"kill@step={step}"
        process = campaign.start(chaos_root, name, faults)
        try:
            process.wait(timeout=float(cfg.attempt_timeout_s))
        except subprocess.TimeoutExpired:  # a hang: kill it, and the campaign fails below
            process.send_signal(signal.SIGKILL)
            process.wait()
        orphans += reap_group(process.pid)
        text = (work / f"{name}.log").read_text()
        completed = process.returncode == 0
        run_dir = run_dir or next(iter(chaos_root.glob("*/*/config.yaml")), Path()).parent
        epoch, exists = checkpoint_state(run_dir) if run_dir != Path() else (None, False)
        logged = epochs_logged(text)
        done_steps = _checkpoint_steps(run_dir) if run_dir != Path() else 0
        record = {"moment": moment, "step": step,
                  "killed": process.returncode == -signal.SIGKILL, "completed_instead": completed,
                  "epochs_logged": logged, "checkpoint_epoch": epoch,
                  "loadable": epoch is not None or not exists,
                  "epochs_redone": max(0, logged - (epoch or 0))}
        record["survived"] = record["killed"] and record["loadable"] and record["epochs_redone"] <= 1
        kills.append(record)
        if completed:
            break  # the run finished before this kill's moment: nothing left to kill

    final = campaign.finish(campaign.start(chaos_root, "final"), "final")
    final_dir = Path(final["run_dir"])
    ref_state = torch.load(reference_dir / "checkpoints" / "last.pt", weights_only=True)
    fin_state = torch.load(final_dir / "checkpoints" / "last.pt", weights_only=True)
    ref_metrics = json.loads((reference_dir / "metrics.json").read_text())
    fin_metrics = json.loads((final_dir / "metrics.json").read_text())
    compared = ("top1", "top5", "loss", "best_top1", "epochs")
    weights_equal = same_tensors(ref_state["model"], fin_state["model"])
    metrics_equal = all(ref_metrics.get(k) == fin_metrics.get(k) for k in compared)
    result = {
        "kills_tried": len(kills),
        "kills_survived": sum(k["survived"] for k in kills),
        "bitwise_equal": weights_equal and metrics_equal,
        "weights_equal": weights_equal,
        "metrics_equal": metrics_equal,
        "max_epochs_redone": max((k["epochs_redone"] for k in kills), default=0),
        "orphaned_workers": orphans,
        "restarts": len(kills) + 1,
        "same_run_folder_name": final_dir.relative_to(chaos_root) == reference_dir.relative_to(work / "reference"),
        "reference": {k: ref_metrics.get(k) for k in compared},
        "final": {k: fin_metrics.get(k) for k in compared},
        "reference_s": round(reference_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "seed": int(cfg.seed),
        "kills": kills,
        "work_dir": str(work) if cfg.keep or cfg.out else None,
    }
    if not cfg.keep and not cfg.out:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = config(sys.argv[1:] if argv is None else argv)
    from dynconv.config import ConfigError

    if not isinstance(cfg.kills, int) or cfg.kills < 1:
        print(f"error: kills={cfg.kills!r} is invalid; allowed values: integers >= 1", file=sys.stderr)
        return 2
    try:
        result = run(cfg)
    except (RuntimeError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    ok = result["bitwise_equal"] and result["kills_survived"] == result["kills_tried"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
