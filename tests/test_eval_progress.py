"""Evaluation shows its progress (dynconv/engine/eval_progress.py): the bar counts the batches on stderr, and the
wrapped loader is the loader for every task (same batches, length, dataset)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from dynconv.engine.eval_progress import ProgressLoader, with_progress


def test_the_bar_counts_every_batch_and_the_loader_is_unchanged(capsys):
    dataset = TensorDataset(torch.arange(10.0))
    loader = DataLoader(dataset, batch_size=4)
    wrapped = with_progress(loader, True, "eval 1/2")
    assert isinstance(wrapped, ProgressLoader)
    assert len(wrapped) == 3 and wrapped.dataset is dataset and wrapped.batch_size == 4
    batches = [batch[0].tolist() for batch in wrapped]
    assert batches == [batch[0].tolist() for batch in loader]
    err = capsys.readouterr().err
    assert "eval 1/2" in err and "/3 " in err  # the bar, with the number of batches as its total


def test_no_bar_where_it_is_off():
    loader = DataLoader(TensorDataset(torch.arange(3.0)))
    assert with_progress(loader, False) is loader
