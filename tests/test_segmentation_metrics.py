"""Mean IoU and pixel accuracy (dynconv/tasks/segmentation/metrics.py) against confusion matrices computed by
hand: the ignore index is left out, a class absent from both target and prediction does not count, and two
gloo processes that each score half the pixels report the metric of all of them."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynconv.tasks.segmentation.metrics import ConfusionMatrix

# 3 classes; target row 0 and prediction row 1, one pixel ignored (255).
TARGET = torch.tensor([[0, 0, 1, 1, 255, 2], [0, 1, 1, 1, 0, 0]])
PREDICTION = torch.tensor([[0, 1, 1, 1, 2, 2], [0, 1, 0, 1, 0, 2]])


def test_confusion_matrix_by_hand():
    confusion = ConfusionMatrix(3)
    confusion.update(PREDICTION, TARGET)
    # Rows: target, columns: prediction (the ignored pixel, predicted 2, is not counted).
    expected = torch.tensor([[3, 1, 1],
                             [1, 4, 0],
                             [0, 0, 1]])
    assert torch.equal(confusion.matrix, expected)
    # IoU: class 0: 3 / (5 + 4 - 3) = 0.5; class 1: 4 / (5 + 5 - 4) = 2/3; class 2: 1 / (1 + 2 - 1) = 0.5.
    torch.testing.assert_close(confusion.iou(), torch.tensor([0.5, 2 / 3, 0.5], dtype=torch.float64))
    summary = confusion.summary()
    assert summary["mIoU"] == pytest.approx(100 * (0.5 + 2 / 3 + 0.5) / 3)
    assert summary["pixel_acc"] == pytest.approx(100 * 8 / 11)
    assert summary["mean_acc"] == pytest.approx(100 * (3 / 5 + 4 / 5 + 1 / 1) / 3)
    assert summary["pixels"] == 11


def test_absent_class_is_left_out_of_the_mean():
    """Class 3 occurs in neither target nor prediction: no IoU (nan), not a 0 that would drag the mean down."""
    confusion = ConfusionMatrix(4)
    confusion.update(PREDICTION, TARGET)
    assert torch.isnan(confusion.iou()[3])
    assert confusion.summary()["mIoU"] == pytest.approx(100 * (0.5 + 2 / 3 + 0.5) / 3)


def test_class_only_predicted_counts_as_zero():
    """A class predicted but never in the target has IoU 0 (a false positive everywhere it is predicted)."""
    confusion = ConfusionMatrix(2)
    confusion.update(torch.tensor([1, 0]), torch.tensor([0, 0]))
    torch.testing.assert_close(confusion.iou(), torch.tensor([0.5, 0.0], dtype=torch.float64))


def test_label_outside_the_classes_is_an_error():
    with pytest.raises(ValueError, match="0..2 or 255"):
        ConfusionMatrix(3).update(torch.tensor([0, 1]), torch.tensor([0, 7]))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        confusion = ConfusionMatrix(3)
        confusion.update(PREDICTION[rank], TARGET[rank])  # rank r scores image r only
        summary = confusion.reduce().summary()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump({"summary": summary, "matrix": confusion.matrix.tolist()}, handle)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reduce_to_the_whole_split(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    whole = ConfusionMatrix(3)
    whole.update(PREDICTION, TARGET)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["matrix"] == whole.matrix.tolist()
        assert result["summary"] == pytest.approx(whole.summary())
