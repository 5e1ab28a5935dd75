"""Statistics of KernelWarehouse's learnt attentions over a dataset (Li & Yao, ICML 2024, Sec. 4.3, Figure 3).

Figure 3 of the paper shows, for every warehouse, "the statistical mean values of learnt attention alpha_ij":
one matrix per warehouse whose rows are all the linear mixtures of all the layers that share it (layers in
forward order, each layer's m rows in its mixture order) and whose columns are the warehouse's n cells. With
the one-to-one initialisation every mixture starts at its own cell (beta, Sec. 3.4), so a trained model whose
mixtures still lean on their own cells shows a dominant diagonal; the off-diagonal mass is the cross-layer
sharing the paper argues for.

`AttentionRecorder(model)` hooks the `attention` module of every `KWConv2d` / `KWLinear` (a forward hook reads
alpha, the first output, of shape (B, m, n)) and sums alpha over samples in float64. It is a context manager:

    with AttentionRecorder(model) as recorder, torch.no_grad():
        model.eval()
        for images, _ in loader:
            model(images)
    stats = recorder.mean_by_warehouse()
    save_attention_stats(stats, "kw_attention.pt")

Only forward passes made while the recorder is active are counted; the hooks are removed on exit. Run it in
eval mode (the attention's BatchNorm then uses its running statistics, as at test time) and under no_grad.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dynconv.engine.checkpoint import atomic_save, atomic_write
from dynconv.engine.distributed import all_reduce_sum
from dynconv.ops.kw.layers import KWConv2d, KWLinear


@dataclass
class _LayerRecord:
    name: str
    warehouse: str
    mixtures: int
    cells: int
    start: int
    local_cells: int
    own_targets: list  # per mixture: its one-to-one warehouse cell, or None (the zero cell, budgets b < 1)
    total: torch.Tensor | None = None  # (m, n) float64 sum of alpha over samples
    samples: int = 0


def kw_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every KernelWarehouse layer, in `named_modules` (forward) order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, (KWConv2d, KWLinear))]


class AttentionRecorder:
    """Accumulates the per-layer sum over samples of KernelWarehouse's alpha (B, m, n) while active.

    Use as a context manager (or call `start()` / `stop()`); `mean_by_warehouse()` then gives Figure 3's matrices.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: dict[str, _LayerRecord] = {}
        self._handles: list = []
        for name, layer in kw_layers(model):
            part = layer.partition
            record = _LayerRecord(name=name, warehouse=layer.warehouse.key, mixtures=part.mixtures,
                                  cells=int(layer.warehouse.cells.shape[0]), start=part.start,
                                  local_cells=part.local_cells, own_targets=list(part.own_targets))
            self.records[name] = record
        if not self.records:
            raise ValueError(f"{type(model).__name__} has no KernelWarehouse layers (KWConv2d / KWLinear): "
                             "build it with op=kw")

    # ----------------------------------------------------------------------------------- recording

    def start(self) -> "AttentionRecorder":
        if self._handles:
            return self
        for name, layer in kw_layers(self.model):
            record = self.records.get(name)
            if record is not None:
                self._handles.append(layer.attention.register_forward_hook(self._hook(record)))
        return self

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "AttentionRecorder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def _hook(record: _LayerRecord):
        def hook(module, inputs, output):
            alpha = output[0].detach()
            summed = alpha.reshape(-1, record.mixtures, record.cells).to(torch.float64).sum(dim=0)
            record.total = summed if record.total is None else record.total + summed.to(record.total.device)
            record.samples += alpha.shape[0]

        return hook

    def reset(self) -> None:
        for record in self.records.values():
            record.total, record.samples = None, 0

    def all_reduce(self) -> None:
        """Sum the totals and counts over the ranks of a process group (no-op on one process). Every rank
        must call it, after all ranks have seen their shard, and every layer must have been called."""
        for record in self.records.values():
            if record.total is None:
                raise RuntimeError(f"KernelWarehouse layer '{record.name}' was never called while recording")
            counted = torch.cat([record.total.flatten(),
                                 torch.tensor([float(record.samples)], dtype=torch.float64,
                                              device=record.total.device)])
            counted = all_reduce_sum(counted)
            record.total = counted[:-1].view(record.mixtures, record.cells)
            record.samples = int(round(counted[-1].item()))

    @property
    def samples(self) -> int:
        """Samples seen: the largest per-layer count (every layer sees every sample once per forward)."""
        return max(record.samples for record in self.records.values())

    # ------------------------------------------------------------------------------------- results

    def mean_by_warehouse(self) -> dict[str, dict[str, Any]]:
        """Per warehouse key: {"alpha": (m_t, n) float64 CPU tensor of mean alpha_ij, "layers": [{"name",
        "rows": [first, end), "own_cells": [start, start + local_cells), "own_targets", "samples"}],
        "samples"}. Rows follow the layers in forward order; a layer never called gets NaN rows."""
        grouped: dict[str, list[_LayerRecord]] = {}
        for record in self.records.values():
            grouped.setdefault(record.warehouse, []).append(record)
        if all(record.samples == 0 for record in self.records.values()):
            raise RuntimeError("no attention was recorded: run forward passes while the recorder is active")
        result: dict[str, dict[str, Any]] = {}
        for key, records in grouped.items():
            rows, layers, row = [], [], 0
            for record in records:
                if record.samples:
                    mean = record.total.detach().cpu() / record.samples
                else:
                    mean = torch.full((record.mixtures, record.cells), float("nan"), dtype=torch.float64)
                rows.append(mean)
                layers.append({
                    "name": record.name,
                    "rows": [row, row + record.mixtures],
                    "own_cells": [record.start, record.start + record.local_cells],
                    "own_targets": list(record.own_targets),
                    "samples": record.samples,
                })
                row += record.mixtures
            result[key] = {"alpha": torch.cat(rows), "layers": layers,
                           "samples": min(record.samples for record in records)}
        return result


def diagonal_fraction(entry: dict[str, Any]) -> float | None:
    """Fraction of a warehouse's rows whose argmax is their own one-to-one cell (the diagonal of Figure 3).

    Rows without a cell of their own (the zero-cell mixtures of budgets b < 1) and NaN rows are left out;
    None when no row is left."""
    alpha = entry["alpha"]
    hits = total = 0
    for layer in entry["layers"]:
        first, _ = layer["rows"]
        for offset, target in enumerate(layer["own_targets"]):
            row = alpha[first + offset]
            if target is None or torch.isnan(row).any():
                continue
            total += 1
            hits += int(row.argmax().item() == target)
    return hits / total if total else None


def summarize(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per warehouse: mixtures m_t, cells n and the diagonal fraction (what the script prints)."""
    return {key: {"mixtures": int(entry["alpha"].shape[0]), "cells": int(entry["alpha"].shape[1]),
                  "diagonal_fraction": diagonal_fraction(entry)}
            for key, entry in stats.items()}


def save_attention_stats(stats: dict[str, dict[str, Any]], path: str | os.PathLike,
                         metadata: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write `stats` (from `mean_by_warehouse`) to `path` (.pt, loadable with weights_only=True) and a JSON
    summary next to it (same name, .json): per warehouse mixtures, cells, diagonal fraction and the layers'
    rows and own cells, plus `metadata`. Both are written to a temporary file in the same directory and renamed
    over the destination, so a reader never sees half a file. Returns (pt path, json path)."""
    path = Path(path)
    if path.suffix != ".pt":
        path = path.with_name(path.name + ".pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"warehouses": stats, "metadata": dict(metadata or {})}
    atomic_save(payload, path)
    summary = summarize(stats)
    for key, entry in stats.items():
        summary[key]["layers"] = [{k: layer[k] for k in ("name", "rows", "own_cells", "samples")}
                                  for layer in entry["layers"]]
    json_path = path.with_suffix(".json")
    text = json.dumps({"warehouses": summary, **dict(metadata or {})}, indent=2) + "\n"
    atomic_write(json_path, lambda handle: handle.write(text), binary=False)
    return path, json_path
