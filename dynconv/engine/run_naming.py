"""The run folder: the same command finds the same folder again, so rerunning it resumes (FAIR-style auto-resume).

`outputs/<backbone>-<op>-<data>[-<task>]/<hash>`, where the hash is of the resolved config except the keys that
do not change what is trained (`resume`, `log.*`, `kernel_memory`; Hydra's own settings are not part of it
either). Every rank of a torchrun or SLURM launch resolves the same config, so all ranks agree on the folder
without talking to each other, and a torchrun restart (`--max-restarts`) or a requeued SLURM job lands in it again.

- `resume=never` asks for a fresh run: the folder gets a suffix that is unique per launch but shared by its
  ranks (the torchrun run id, the SLURM job id, else the time), and never collides with the resumable one.
- `DYNCONV_RUN_NAME=<name>` names the folder outright; `hydra.run.dir=<dir>` still chooses any folder.
- Sweeps (`-m`) keep Hydra's per-job folders under `multirun/<date>/<time>/`, named `<job number>_<overrides>`
  made safe (`job_folder_name`): no `/` from a path value, at most 80 characters (longer names end in a hash
  of the whole override string), so a 20-override sweep or `data.root=/some/path` never fails on the file name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Top-level keys that do not change the trained model or its numbers: the same run whatever their value
# (`kernel_memory` only chooses whether the backward remakes the kernels: the same values to the bit).
IGNORED_KEYS = ("hydra", "resume", "log", "reproduce", "kernel_memory")
HASH_LENGTH = 10
# Keys added to the configs after runs were already named by this hash, at the value that trains exactly what the
# config trained before the key existed: left out of the hash at that value, so rerunning the command of a run
# started before the key existed still finds its folder (and resumes). Any other value changes the hash.
NEUTRAL_ADDITIONS: dict[str, Any] = {"init_from_static": None, "op.layout": "paper"}


def config_fingerprint(cfg: DictConfig | dict[str, Any]) -> str:
    """A short hash of the resolved config without IGNORED_KEYS (stable across processes and machines)."""
    if isinstance(cfg, DictConfig):
        plain = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
                 for key in cfg if key not in IGNORED_KEYS}
    else:
        plain = {key: value for key, value in cfg.items() if key not in IGNORED_KEYS}
    for dotted, neutral in NEUTRAL_ADDITIONS.items():
        *parents, leaf = dotted.split(".")
        section = plain
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if isinstance(section, dict) and leaf in section and section[leaf] == neutral:
            section = dict(section)  # a copy: the caller's config stays as it is
            del section[leaf]
            _replace(plain, parents, section)
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def _replace(plain: dict[str, Any], parents: list[str], section: dict[str, Any]) -> None:
    """Put `section` at `parents` in `plain`, copying the dictionaries on the way (the originals are not ours)."""
    if not parents:
        plain.clear()
        plain.update(section)
        return
    node = plain
    for parent in parents[:-1]:
        node[parent] = dict(node[parent])
        node = node[parent]
    node[parents[-1]] = section


def run_label(cfg: DictConfig) -> str:
    """A readable first level: what is trained on what."""
    parts = [OmegaConf.select(cfg, key) for key in ("backbone.name", "op.name", "data.name")]
    task = OmegaConf.select(cfg, "task.name")
    if task and task != "classification":
        parts.append(task)
    return "-".join(str(part) for part in parts if part) or "run"


_LAUNCH_TIME = datetime.now().strftime("%Y%m%d-%H%M%S")  # once per process: every resolution agrees


def launch_id() -> str:
    """Unique per launch, identical on every rank of it (torchrun's run id, the SLURM job), else the start time."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return run_id
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm{os.environ['SLURM_JOB_ID']}"
    return _LAUNCH_TIME


def run_folder(*, _root_: DictConfig) -> str:
    """The `${dynconv_run_dir:}` resolver of configs/train.yaml's hydra.run.dir."""
    if os.environ.get("DYNCONV_RUN_NAME"):
        return os.environ["DYNCONV_RUN_NAME"]
    from omegaconf.errors import OmegaConfBaseException

    try:
        name = f"{run_label(_root_)}/{config_fingerprint(_root_)}"
    except OmegaConfBaseException:
        # A value that does not resolve (`recipe.lr=${oops}`): validation names its key before anything is written
        # into this placeholder folder (a rejected run removes it).
        return "unresolved-config"
    if OmegaConf.select(_root_, "resume") == "never":
        name += f"-{launch_id()}"
    return name


JOB_NAME_LIMIT = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]+")


def job_folder_name(override_dirname: str) -> str:
    """A sweep job's folder name from Hydra's `override_dirname` ("data.root=/a/b,op.lam=4"): characters that are
    unsafe in a file name (`/`, spaces, brackets, quotes) become `_`; a name longer than JOB_NAME_LIMIT is cut and
    ends in a short hash of the whole string, so it stays unique. Empty (no overrides): "run"."""
    safe = _UNSAFE.sub("_", override_dirname).strip("_.") or "run"
    if len(safe) <= JOB_NAME_LIMIT:
        return safe
    digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:8]
    return f"{safe[:JOB_NAME_LIMIT - 9]}-{digest}"


def register_run_folder_resolver() -> None:
    if not OmegaConf.has_resolver("dynconv_run_dir"):
        OmegaConf.register_new_resolver("dynconv_run_dir", run_folder)  # (a resolver given _root_ cannot be cached)
    if not OmegaConf.has_resolver("dynconv_job_dir"):
        OmegaConf.register_new_resolver("dynconv_job_dir", job_folder_name)
