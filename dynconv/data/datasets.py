"""The DATASETS registry: every `data=` name, which tasks it serves, how its layout is checked before a run
writes anything, and where its loaders read it.

Each task package registers its own datasets (`dynconv/tasks/<task>/datasets.py`); the config checks, the
tasks' `data_names` and the loaders all read this one table, so a new dataset is one registration (and a
`configs/data/<name>.yaml`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from dynconv.registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: `kind` is the `Task.data_kind` of the tasks that can train on it ("classification",
    "detection"); `check(data_cfg)` raises ConfigError naming data.root and the expected layout (for an
    embedded dataset, which is written on first use: that data.root holds nothing else); `locate(data_cfg)`
    returns the folder the loaders read (writing an embedded dataset there first); `recognise(folder)` says
    whether an existing folder looks like this dataset (cheap: names only, no file read), so that a data.root
    given to the wrong `data=` can be answered with the right one. `check_eval(data_cfg)`: the same check for
    an evaluation, which reads the validation split only (eval.py on a folder without train/); None: `check`."""

    name: str
    kind: str
    check: Callable[[Mapping[str, Any]], None]
    locate: Callable[[Mapping[str, Any]], Path]
    embedded: bool = False
    recognise: Callable[[Path], bool] | None = None
    check_eval: Callable[[Mapping[str, Any]], None] | None = None


DATASETS: Registry[DatasetSpec] = Registry("dataset", "data.name")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name)(spec)


def names_for(kind: str) -> tuple[str, ...]:
    """The datasets a task of `kind` can train on (registration order)."""
    return tuple(name for name, spec in DATASETS.items() if spec.kind == kind)


def dataset_for(data_cfg: Mapping[str, Any], kind: str) -> DatasetSpec:
    """The registered dataset `data.name` names, which must serve tasks of `kind` (ValueError listing those)."""
    name = str(data_cfg.get("name", "")).lower()
    if name not in DATASETS or DATASETS.get(name).kind != kind:
        raise ValueError(f"data.name={data_cfg.get('name')!r} is not a {kind} dataset; valid: "
                         f"{', '.join(names_for(kind))}")
    return DATASETS.get(name)


def datasets_recognising(folder: Path) -> list[DatasetSpec]:
    """The registered datasets whose layout `folder` has (registration order)."""
    found = []
    for _name, spec in DATASETS.items():
        try:
            if spec.recognise is not None and spec.recognise(folder):
                found.append(spec)
        except OSError:
            continue  # an unreadable folder is simply not recognised
    return found


def data_root(data_cfg: Mapping[str, Any]) -> Path:
    """`data.root` as a path (the config checks have made sure it is set)."""
    if data_cfg.get("root") in (None, ""):
        raise ValueError(f"data.root must be set for dataset {data_cfg.get('name')!r}")
    return Path(str(data_cfg.get("root"))).expanduser()
