"""Reading a pickle that came from elsewhere (CIFAR's python release) without letting it run code.

Why: `pickle.load` calls whatever functions the file names, so a crafted file in a dataset folder (downloaded
from a mirror, shared on a cluster) runs arbitrary code as the user the moment training starts. Data pickles
only need to rebuild plain containers and numpy arrays, so the unpickler here resolves exactly those names
and refuses every other one, naming the file and the name it asked for.
"""

from __future__ import annotations

import codecs
import os
import pickle
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "load_data_pickle"]


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks for a Python object that a data pickle never needs."""


def _numpy_reconstructors() -> dict[str, Any]:
    # Taken from numpy itself rather than imported by module path: numpy 2 moved them from numpy.core to
    # numpy._core, and a pickle names whichever module the writer's numpy had.
    return {
        "_reconstruct": np.ndarray.__reduce__(np.zeros(1))[0],  # every ndarray, protocols 0-4
        "_frombuffer": np.ndarray.__reduce_ex__(np.zeros(1), 5)[0],  # contiguous ndarrays, protocol 5
        "scalar": np.int64(0).__reduce__()[0],  # numpy scalars (np.int64 labels)
    }


def _allowed() -> dict[tuple[str, str], Any]:
    numpy_private = _numpy_reconstructors()
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = numpy_private["_reconstruct"]
        allowed[(f"{package}.multiarray", "scalar")] = numpy_private["scalar"]
        allowed[(f"{package}.numeric", "_frombuffer")] = numpy_private["_frombuffer"]
    # Containers pickled by name (set, frozenset, bytearray; b"" at protocol < 3) and, for Python 3 pickles of
    # bytes at protocol < 3, _codecs.encode(text, "latin1"). Python 2 names the builtins module __builtin__.
    for module in ("builtins", "__builtin__"):
        for container in (list, dict, tuple, set, frozenset, bytes, bytearray):
            allowed[(module, container.__name__)] = container
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class _DataUnpickler(pickle.Unpickler):
    """Resolves only the names in `_allowed()`; anything else raises UnsafePickleError naming the file."""

    def __init__(self, file, path: str, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._path = path
        self._allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self._path} asks to load {module}.{name}, which a data pickle never needs (only numpy arrays "
                "and plain containers are allowed); refusing to unpickle it, since unpickling could run code. "
                "Use the original files of the dataset's release")
        return found


def load_data_pickle(path: str | os.PathLike, *, encoding: str = "ASCII") -> Any:
    """`pickle.load` of `path` limited to numpy arrays, numpy scalars and builtin containers."""
    with open(path, "rb") as handle:
        return _DataUnpickler(handle, str(path), encoding=encoding).load()
