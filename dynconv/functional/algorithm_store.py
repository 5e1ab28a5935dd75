"""Measured algorithm choices kept across runs: measure once per machine and library versions, not once per run.

Why: timing the candidates of every layer shape costs a fresh process several ordinary steps (ResNet18 at 224 px,
batch 16, on 2 CPU cores: about seven), and a short run, an evaluation or each job of a sweep paid it again for the
same shapes on the same machine. The selector (`selector.py`, precedence step 6) looks a key up here after its
in-process cache and before timing, and stores what it measured where the measurement was clean (the winner's
repeated timings agreed: a choice measured while another process fought for the cores stays in that process
only, and the next run measures again).

One JSON file per *fingerprint*: the CPU model and core count, torch's intra-op thread count, the torch version,
the CUDA device's name for CUDA keys, and `ALGORITHMS_VERSION` (raised whenever an algorithm changes). A choice
made on another machine, with another thread count or another torch never applies. Inside the file the keys are
the selector's readable key strings (`selector.describe`), the same as in a run folder's `conv_algorithms.json`.

Where: `$DYNCONV_ALGORITHM_CACHE` (a folder), else `$XDG_CACHE_HOME/dynconv/conv_algorithms`, else
`~/.cache/dynconv/conv_algorithms`; `DYNCONV_ALGORITHM_CACHE=off` turns it off (the tests do, so that each of them
measures). Writes are atomic (a temporary file renamed over the old one) and merge with what another process
(a DDP rank, a sweep's job) stored meanwhile; a file that cannot be read is reported with its path and replaced; a
folder that cannot be written is reported once and the run goes on without storing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

ENV_VAR = "DYNCONV_ALGORITHM_CACHE"
OFF_VALUES = ("off", "0", "false", "no", "none")
# Raise when an algorithm's implementation changes (its speed, not its result): stored choices then no longer apply.
# 2: KernelWarehouse "fused" became a candidate; 3: mixture "triton" (CUDA); 4: per-sample "bmm_t" (training), mixture
# "fused" under autocast.
ALGORITHMS_VERSION = 4

_loaded: dict[Path, dict[str, dict[str, Any]]] = {}
_write_failed: set[Path] = set()


def folder() -> Path | None:
    """The cache folder, or None when turned off (read from the environment on every call: tests and launchers
    set it after import)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dynconv" / "conv_algorithms"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(device: torch.device) -> dict[str, Any]:
    """What a stored choice is valid for (see the module docstring)."""
    facts: dict[str, Any] = {
        "cpu": _cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "algorithms": ALGORITHMS_VERSION,
    }
    if device.type == "cuda":
        facts["cuda_device"] = torch.cuda.get_device_name(device)
    return facts


def path_for(device: torch.device) -> Path | None:
    root = folder()
    if root is None:
        return None
    facts = fingerprint(device)
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{device.type}-{digest}.json"


def _read(path: Path, quiet: bool = False) -> dict[str, dict[str, Any]]:
    """The file's choices; {} when absent or unreadable (reported unless `quiet`: the lookup already said so)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as error:
        if not quiet:
            warnings.warn(f"conv algorithm cache {path} cannot be read ({error}); measuring instead", stacklevel=3)
        return {}
    try:
        data = json.loads(text)
        choices = data["choices"]
        if not isinstance(choices, dict) or not all(
                isinstance(c, dict) and isinstance(c.get("algorithm"), str) for c in choices.values()):
            raise ValueError("entries are not {algorithm, ms} objects")
    except (ValueError, KeyError, TypeError) as error:
        if not quiet:
            warnings.warn(f"conv algorithm cache {path} is corrupt ({error}); ignoring it, it will be rewritten",
                          stacklevel=3)
        return {}
    return choices


def lookup(device: torch.device, key_text: str) -> dict[str, Any] | None:
    """The stored choice for this key on this machine, or None (not stored, or the cache is off)."""
    path = path_for(device)
    if path is None:
        return None
    if path not in _loaded:
        _loaded[path] = _read(path)
    return _loaded[path].get(key_text)


def remember(device: torch.device, key_text: str, choice: dict[str, Any]) -> None:
    """Store one clean measurement, merged with the file's current content, atomically."""
    path = path_for(device)
    if path is None or path in _write_failed:
        return
    merged = {**_read(path, quiet=True), **_loaded.get(path, {}), key_text: choice}
    _loaded[path] = merged
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False,
                                         encoding="utf-8") as handle:
            temporary = handle.name
            json.dump({"fingerprint": fingerprint(device), "choices": merged}, handle, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        _write_failed.add(path)
        warnings.warn(f"conv algorithm cache {path} cannot be written ({error}); choices are kept for this process "
                      f"only (set {ENV_VAR} to a writable folder, or to 'off')", stacklevel=3)


def forget() -> None:
    """Drop what this process read (the files stay); the next lookup reads them again."""
    _loaded.clear()
    _write_failed.clear()
