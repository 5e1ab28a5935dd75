"""The detection datasets: `data=coco` (the COCO 2017 layout) and `data=toy_coco` (embedded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from dynconv.config import ConfigError
from dynconv.data.datasets import DatasetSpec, data_root, register_dataset
from dynconv.tasks.detection.coco import validate_coco_root
from dynconv.tasks.detection.loaders import split_name
from dynconv.tasks.detection.toy_coco import check_toy_coco_root, ensure_toy_coco

KIND = "detection"


def _check_coco(data_cfg: Mapping[str, Any]) -> None:
    root = data_cfg.get("root")
    if root in (None, ""):
        raise ConfigError("data.root is not set: pass data.root=DIR or set COCO_DIR "
                          "(DIR/annotations/instances_{train,val}2017.json, DIR/train2017/, DIR/val2017/)")
    try:
        validate_coco_root(root, (split_name(data_cfg, "train"), split_name(data_cfg, "val")))
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise ConfigError(f"data.root={root!r}: {error}") from None


def looks_like_coco(folder: Path) -> bool:
    """annotations/instances_*.json, whatever the split names; nothing is read."""
    return (folder / "annotations").is_dir() and any((folder / "annotations").glob("instances_*.json"))


register_dataset(DatasetSpec("coco", KIND, check=_check_coco, locate=data_root, recognise=looks_like_coco))
register_dataset(DatasetSpec(
    "toy_coco", KIND, embedded=True,
    # data.root must be the toy tree, absent, or an empty folder: anything else is refused, unchanged.
    check=lambda data_cfg: check_toy_coco_root(data_root(data_cfg)),
    locate=lambda data_cfg: ensure_toy_coco(data_root(data_cfg))))
