"""The counting columns of a table row, computed on the spot from the row's overrides.

Each row's overrides are composed with configs/train.yaml (the same groups `train.py` composes) and its
classification network is built on the meta device (no memory, no initialisation), then counted as
`scripts/profile.py` counts (dynconv/profiling.py): parameters, parameters after folding training-only
reparameterisations, MACs of one image, and for KernelWarehouse the mixtures m and cells n per warehouse
(KernelWarehouse Table 14). Classification rows count at the data's resolution and classes (224 px and 1000
classes for ImageNet, 32 px and 100 for CIFAR-100); detection rows count their backbone as the tables print it,
the ImageNet network at 224 px.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from dynconv.reproduction.tables import COUNT_KINDS, Row, Table


@dataclass
class RowCounts:
    values: dict[str, Any]  # count kind -> value (ints; lists for kw_m / kw_n)
    error: str | None = None  # why the row did not compose or build


@contextlib.contextmanager
def composer() -> Iterator:
    """A function overrides -> composed train config, inside one Hydra context (composing many rows fast)."""
    from hydra import compose, initialize_config_dir

    from dynconv.compose import CONFIG_DIR
    from dynconv.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        yield lambda overrides: compose(config_name="train", overrides=list(overrides))


def compose_row(compose, table: Table, row: Row) -> DictConfig:
    """The row's train config; raises with the override at fault (Hydra's message) on a bad one."""
    from dynconv.config import validate_model_config
    from dynconv.overrides import reject_added_keys

    overrides = table.row_overrides(row)
    cfg = compose(overrides)
    reject_added_keys(overrides, "train")
    validate_model_config(cfg)
    return cfg


def counting_size(cfg: DictConfig) -> tuple[int, int]:
    """(classes, resolution) the paper counts this row's network at."""
    if cfg.task.name == "classification":
        classes = OmegaConf.select(cfg, "data.num_classes") or 1000
        side = OmegaConf.select(cfg, "data.image_size") or cfg.backbone.get("default_resolution", 224)
        return int(classes), int(side)
    return 1000, int(cfg.backbone.get("default_resolution", 224))


def warehouse_sizes(model: torch.nn.Module) -> tuple[list[int], list[int]]:
    """KernelWarehouse Table 14's m (linear mixtures over the layers sharing a warehouse) and n (kernel cells),
    one entry per warehouse in the order the network first uses it."""
    from dynconv.ops.kw.layers import KWConv2d, KWLinear

    mixtures: dict[str, int] = {}
    cells: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (KWConv2d, KWLinear)):
            key = module.warehouse.key
            mixtures[key] = mixtures.get(key, 0) + module.partition.mixtures
            cells[key] = int(module.warehouse.cells.shape[0])
    return list(mixtures.values()), [cells[key] for key in mixtures]


def count_segmentation(cfg: DictConfig, kinds: set[str]) -> dict[str, Any]:
    """A segmentation row counts the whole network (backbone and head) at the size that reproduces DyNet Table 3's
    ResNet50 GFLOPs (768 x 768, `dynconv/tasks/segmentation/profile.py`), with its dataset's classes
    (Cityscapes' 19 unless the row's data says otherwise)."""
    from dynconv.tasks import TASKS
    from dynconv.tasks.segmentation.profile import DEFAULT_SIDE, profile_segmenter

    classes = int(OmegaConf.select(cfg, "data.num_classes") or 19)
    with torch.device("meta"):
        counts = profile_segmenter(TASKS.get("segmentation"), cfg, DEFAULT_SIDE, classes)
    values = {"params": counts["params"], "macs": counts["macs"], "backbone_params": counts["backbone_params"],
              "backbone_macs": counts["backbone_macs"]}
    return {kind: value for kind, value in values.items() if kind in kinds}


def count_config(cfg: DictConfig, kinds: Iterable[str]) -> dict[str, Any]:
    """The requested count kinds for a composed config (meta device)."""
    from dynconv.build import build_backbone
    from dynconv.profiling import count_macs, count_params, fold_for_inference

    kinds = set(kinds)
    if cfg.task.name == "segmentation":
        return count_segmentation(cfg, kinds)
    classes, side = counting_size(cfg)
    with torch.device("meta"):
        built = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn,
                               num_classes=classes, image_size=side)
    model = built.backbone
    values: dict[str, Any] = {}
    params = count_params(model)
    values["params"] = values["backbone_params"] = params
    if kinds & {"macs", "backbone_macs"}:
        values["macs"] = values["backbone_macs"] = count_macs(model, (3, side, side)).total
    if kinds & {"params_inference", "macs_inference"}:
        folded = fold_for_inference(model)
        values["params_inference"] = count_params(folded)
        if "macs_inference" in kinds:
            values["macs_inference"] = count_macs(folded, (3, side, side)).total
    if kinds & {"kw_m", "kw_n"}:
        values["kw_m"], values["kw_n"] = warehouse_sizes(model)
    return {kind: value for kind, value in values.items() if kind in kinds}


def count_rows(table: Table, compose, cache: dict | None = None) -> dict[str, RowCounts]:
    """Counts for every buildable row of `table` (the same overrides are counted once, across tables too)."""
    kinds = [column.kind for column in table.columns if column.kind in COUNT_KINDS]
    cache = {} if cache is None else cache
    results: dict[str, RowCounts] = {}
    for row in table.rows:
        if not row.buildable:
            continue
        key = (tuple(table.row_overrides(row)), tuple(sorted(kinds)))
        if key not in cache:
            try:
                cfg = compose_row(compose, table, row)
                cache[key] = RowCounts(count_config(cfg, kinds) if kinds else {})
            except Exception as error:  # noqa: BLE001 - reported per row; the other rows are still counted
                cache[key] = RowCounts({}, f"{type(error).__name__}: {error}".splitlines()[0][:300])
        results[row.id] = cache[key]
    return results
