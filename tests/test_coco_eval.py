"""CocoEvaluator on hand-made detections gives what pycocotools gives: perfect -> 100, shifted boxes -> the AP
the IoU implies, labels mapped back to non-contiguous category ids, no detections -> 0, ranks gathered."""

from __future__ import annotations

import json
import logging
import os
import socket

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dynconv.tasks.detection.coco_eval import CocoEvaluator, encode_masks

CATEGORY_IDS = [3, 7]  # labels 1, 2 (non-contiguous on purpose)
# (image id, height, width, [(category id, x, y, w, h)]): a small (20x20), medium (40x40, 40x30) and large
# (120x100) object, so every area range of COCOeval has ground truth.
IMAGES = [
    (11, 100, 100, [(3, 10, 10, 20, 20), (7, 50, 40, 40, 40)]),
    (42, 120, 160, [(7, 20, 10, 120, 100), (3, 0, 80, 40, 30)]),
]


def write_gt(tmp_path) -> COCO:
    """A tiny COCO json (rectangle polygons) written to disk and loaded the way the data pipeline does."""
    dataset = {"images": [], "annotations": [],
               "categories": [{"id": c, "name": f"cat{c}"} for c in CATEGORY_IDS]}
    for image_id, h, w, objects in IMAGES:
        dataset["images"].append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.png"})
        for category, x, y, bw, bh in objects:
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image_id, "category_id": category,
                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(dataset))
    return COCO(str(path))


def outputs_for(coco: COCO, shift_fraction: float = 0.0, with_masks: bool = True, score_base: float = 0.9):
    """Detections equal to the ground truth (boxes XYXY, labels 1..K, masks rasterised by pycocotools itself),
    boxes moved right by `shift_fraction` of their width; and the matching targets."""
    outputs, targets = [], []
    for image_id, h, w, _ in IMAGES:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        boxes = torch.tensor([[x + shift_fraction * bw, y, x + bw + shift_fraction * bw, y + bh]
                              for x, y, bw, bh in (a["bbox"] for a in anns)], dtype=torch.float32)
        output = {"boxes": boxes,
                  "labels": torch.tensor([CATEGORY_IDS.index(a["category_id"]) + 1 for a in anns]),
                  "scores": torch.tensor([score_base - 0.1 * i for i in range(len(anns))])}
        if with_masks:
            output["masks"] = torch.stack([torch.from_numpy(coco.annToMask(a)).float() for a in anns])[:, None]
        outputs.append(output)
        targets.append({"image_id": image_id})
    return outputs, targets


def evaluate(coco, outputs, targets, iou_types=("bbox", "segm"), category_ids=CATEGORY_IDS, **kw):
    evaluator = CocoEvaluator(coco, iou_types, category_ids, **kw)
    evaluator.update(outputs, targets)
    return evaluator.summarize(), evaluator


def test_perfect_detections_score_100(tmp_path, caplog):
    coco = write_gt(tmp_path)
    with caplog.at_level(logging.INFO, logger="dynconv"):
        metrics, _ = evaluate(coco, *outputs_for(coco))
    assert set(metrics) == {f"{t}_{s}" for t in ("bbox", "segm") for s in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    for key, value in metrics.items():
        assert value == pytest.approx(100.0), key
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in caplog.text  # COCOeval's table goes to the log


def test_shifted_boxes_match_pycocotools(tmp_path):
    """Boxes moved right by 1/5 of their width have IoU (w - w/5) / (w + w/5) = 2/3 with their object: matched at
    the IoU thresholds 0.50, 0.55, 0.60, 0.65 and missed from 0.70 on, so AP50 = 100, AP75 = 0 and AP = 4/10
    of 100. The evaluator gives exactly what COCOeval gives on the same results written by hand."""
    coco = write_gt(tmp_path)
    outputs, targets = outputs_for(coco, shift_fraction=0.2, with_masks=False)
    metrics, _ = evaluate(coco, outputs, targets, iou_types=("bbox",))
    assert metrics["bbox_AP50"] == pytest.approx(100.0)
    assert metrics["bbox_AP75"] == pytest.approx(0.0)
    assert metrics["bbox_AP"] == pytest.approx(40.0)

    results = [{"image_id": t["image_id"], "category_id": CATEGORY_IDS[int(label) - 1],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
               for o, t in zip(outputs, targets)
               for (x1, y1, x2, y2), label, score in zip(o["boxes"].tolist(), o["labels"], o["scores"])]
    direct = COCOeval(coco, coco.loadRes(results), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    expected = [100.0 * v for v in direct.stats[:6]]
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    assert [metrics[f"bbox_{n}"] for n in names] == pytest.approx(expected)


def test_labels_map_back_to_category_ids(tmp_path):
    """Label l is reported as category_ids[l - 1]; with the mapping reversed every detection has the wrong
    category (AP 0); label 0 (background) and labels above K are dropped."""
    coco = write_gt(tmp_path)
    outputs, targets = outputs_for(coco, with_masks=False)
    _, evaluator = evaluate(coco, outputs, targets, iou_types=("bbox",))
    assert {r["category_id"] for r in evaluator.results["bbox"]} == set(CATEGORY_IDS)
    first = evaluator.results["bbox"][0]
    assert (first["image_id"], first["category_id"], first["bbox"]) == (11, 3, [10.0, 10.0, 20.0, 20.0])
    swapped, _ = evaluate(coco, outputs, targets, iou_types=("bbox",), category_ids=CATEGORY_IDS[::-1])
    assert swapped["bbox_AP"] == 0.0
    outputs[0]["labels"] = torch.tensor([0, 3])
    _, evaluator = evaluate(coco, outputs, targets, iou_types=("bbox",))
    assert [r["image_id"] for r in evaluator.results["bbox"]] == [42, 42]


def test_no_detections_score_zero(tmp_path):
    coco = write_gt(tmp_path)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
              "masks": torch.zeros(0, 1, h, w)} for _, h, w, _ in IMAGES]
    metrics, _ = evaluate(coco, empty, [{"image_id": i} for i, *_ in IMAGES])
    assert all(value == 0.0 for value in metrics.values()), metrics


def test_missing_area_range_is_minus_one(tmp_path):
    """Only image 11 evaluated (image_ids): it has no large object, so APl is pycocotools' -1 (undefined)."""
    coco = write_gt(tmp_path)
    outputs, targets = outputs_for(coco, with_masks=False)
    metrics, _ = evaluate(coco, outputs[:1], targets[:1], iou_types=("bbox",), image_ids=[11])
    assert metrics["bbox_APl"] == -1.0 and metrics["bbox_AP"] == pytest.approx(100.0)


def test_mask_encoding_round_trip():
    masks = torch.zeros(2, 1, 5, 7)
    masks[0, 0, 1:3, 2:6] = 0.9
    masks[1, 0, 4, 0] = 0.6
    masks[1, 0, 0, 0] = 0.4  # below 0.5: background
    rles = encode_masks(masks)
    assert all(isinstance(rle["counts"], str) for rle in rles)
    json.dumps(rles)
    decoded = mask_util.decode([{**rle, "counts": rle["counts"].encode()} for rle in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1), (masks[:, 0] > 0.5).numpy().astype(np.uint8))


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        coco = COCO(os.path.join(root, "instances_val.json"))
        outputs, targets = outputs_for(coco, shift_fraction=0.2)
        # Rank r scores image r only; the metrics must be those of both images together, on every rank.
        metrics, _ = evaluate(coco, outputs[rank:rank + 1], targets[rank:rank + 1])
        with open(os.path.join(root, f"rank{rank}.json"), "w") as handle:
            json.dump(metrics, handle)
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_results(tmp_path):
    coco = write_gt(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    expected, _ = evaluate(coco, *outputs_for(coco, shift_fraction=0.2))
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == pytest.approx(expected)
