"""Checkpoints that survive crashes: written to a temporary file, fsynced, then renamed over the old one.

The payload holds only tensors, numbers, strings and plain containers (the resolved config as a dict, RNG
states as tensors), so `torch.load(path, weights_only=True)` reads it, and every load here is weights-only: a
file that would run code when unpickled is refused (`UntrustedCheckpointError`), whoever made it.

A run directory's `checkpoints/` holds:
- `last.pt`: the full training state (weights, optimizer, schedule, EMA, RNG, metrics, config);
- `previous.pt` (with `checkpoint.keep_last=2`): the full state before it, for when `last.pt` cannot be read;
- `best.pt`: what evaluation needs (weights, EMA weights, config, class names, metrics), not the optimizer.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read; the message names its path."""


class UntrustedCheckpointError(CorruptCheckpointError):
    """A checkpoint that holds Python objects a weights-only load refuses to run (it could execute code)."""


def serialize(payload: dict[str, Any], handle: IO) -> None:
    """Write `payload` to an open binary file (a module function so that fault injection can wrap it)."""
    torch.save(payload, handle)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left beside its target (`.<name>.<random>.tmp`); they were
    never renamed into place, so nothing refers to them."""
    directory = Path(directory)
    stale = sorted(directory.glob(".*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True,
                 before_replace: Callable[[], None] | None = None) -> Path:
    """Call `write(handle)` on a temporary file beside `path`, then rename it over `path`: `path` is always
    either the old or the new complete file. `before_replace` runs once the new file is complete and on disk,
    just before the rename (rotation of the previous file). An error (a full or read-only disk) removes the
    temporary file and leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp_name, path)
        # The rename itself must reach the disk before we call the file saved.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def atomic_save(payload: dict[str, Any], path: str | os.PathLike, previous: str | os.PathLike | None = None) -> Path:
    """torch.save `payload` to `path` atomically (`atomic_write`). With `previous`, the old `path` (if any) is
    renamed to `previous` once the new file is complete: a crash between the two renames leaves `previous`
    and a complete temporary file, never a truncated checkpoint."""
    path = Path(path)

    def rotate() -> None:
        if previous is not None and path.exists():
            os.replace(path, previous)

    return atomic_write(path, lambda handle: serialize(payload, handle), before_replace=rotate)


def _refused_globals(error: Exception) -> str:
    """The part of torch's weights-only message that names what the file wanted to run."""
    text = str(error)
    for line in text.splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a dynconv checkpoint weights-only (tensors and plain containers; never code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only load failed" in str(error):
            raise UntrustedCheckpointError(
                f"refused to load {path}: it holds Python objects that a weights-only load does not run "
                f"({_refused_globals(error)}). dynconv loads every checkpoint with weights_only=True so that a "
                "file cannot execute code; a dynconv checkpoint holds only tensors, numbers and strings") from None
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {error}") from error
    except Exception as error:  # torch raises several types for truncated / foreign files
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(payload, dict) or "model" not in payload:
        raise CorruptCheckpointError(f"{path} is not a dynconv checkpoint (no 'model' entry)")
    return payload


def checkpoint_in_run(folder: str | os.PathLike) -> Path | None:
    """The checkpoint a run folder stands for: its `checkpoints/best.pt`, else `checkpoints/last.pt` (also found
    directly in `folder`, for a folder of checkpoints); None when it has neither."""
    folder = Path(folder)
    for name in ("best.pt", "last.pt"):
        for candidate in (folder / "checkpoints" / name, folder / name):
            if candidate.is_file():
                return candidate
    return None


def find_resumable(directory: str | os.PathLike) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest readable full training state in a run's `checkpoints/` (`last.pt`, else `previous.pt`).

    Returns (path, payload, problems): `problems` describes every candidate that exists but cannot be read
    (a corrupt `last.pt` is reported, and the run falls back to `previous.pt`). An untrusted file is never
    skipped silently: it raises."""
    directory = Path(directory)
    problems = []
    for name in ("last.pt", "previous.pt"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            return path, load_checkpoint(path), problems
        except UntrustedCheckpointError:
            raise
        except CorruptCheckpointError as error:
            problems.append(str(error))
    return None, None, problems


def ema_weights(payload: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The EMA weights of a checkpoint: `best.pt` stores them at the top level, a full state in its EMA hook."""
    if payload.get("ema") is not None:
        return payload["ema"]
    return payload.get("hooks", {}).get("EMAHook", {}).get("ema")


def evaluation_payload(state: dict[str, Any], class_names: list[str] | None) -> dict[str, Any]:
    """What `best.pt` keeps of a full training state: the weights, the EMA weights, the config, the class names
    and the metrics (what eval.py, init_from and inference need), not the optimizer, schedule or RNG state."""
    return {
        "model": state["model"],
        "ema": ema_weights(state),
        "config": state["config"],
        "class_names": list(class_names) if class_names is not None else None,
        "epoch": state["epoch"],
        "global_step": state["global_step"],
        "metrics": state["metrics"],
        "best_metrics": state["best_metrics"],
        "world_size": state["world_size"],
    }


def capture_rng_state() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        # Python's state is a tuple of ints: store it as a tensor so weights_only loading accepts it.
        "python": _python_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_state() -> dict[str, Any]:
    """random.getstate() as tensors and floats (weights_only-loadable), including the cached Gaussian
    that random.gauss() returns next (timm's RandAugment draws magnitudes with it)."""
    import random

    version, internal, gauss_next = random.getstate()
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def restore_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype("uint32"), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    python = state["python"]
    gauss_next = python.get("gauss_next")
    gauss_next = None if gauss_next is None else float(gauss_next)
    random.setstate((python["version"], tuple(python["state"].tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
