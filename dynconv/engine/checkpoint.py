"""Checkpoints that survive crashes: written to a temporary file, fsynced, then renamed over the old one.

The payload holds only tensors, numbers, strings and plain containers (the resolved config as a dict, RNG
states as tensors), so `torch.load(path, weights_only=True)` reads it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read; the message names its path."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Call `write(handle)` on a temporary file beside `path`, then rename it over `path`: `path` is always
    either the old or the new complete file."""
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


def atomic_save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save `payload` to `path` atomically (`atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated / foreign files
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(payload, dict) or "model" not in payload:
        raise CorruptCheckpointError(f"{path} is not a dynconv checkpoint (no 'model' entry)")
    return payload


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
