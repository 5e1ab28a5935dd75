"""COCO-format detection dataset: contiguous labels, counted filtering, named missing/corrupt files.

Why a subclass of torchvision's ``CocoDetection``: it already loads the annotation JSON through pycocotools
and maps image ids to files; what it lacks is what training needs and what hides data problems when
missing: crowd annotations and zero-size boxes must not reach the loss, images left without any annotation
are useless in training (but still part of the evaluation), category ids (1..90 with holes in COCO) must
become contiguous labels, and a missing or corrupt file must be reported by its path.  Every dropped item
is counted in ``stats`` so the build can log what was left out instead of silently training on less.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection

from dynconv.data.images import CorruptImageError, CorruptSample, load_rgb

__all__ = [
    "CocoDetectionDataset",
    "EXPECTED_COCO_LAYOUT",
    "ann_to_mask",
    "annotation_file",
    "coco_subset",
    "validate_coco_root",
]

EXPECTED_COCO_LAYOUT = (
    "expected the COCO 2017 layout DIR/annotations/instances_{train2017,val2017}.json, "
    "DIR/train2017/*.jpg, DIR/val2017/*.jpg"
)


def annotation_file(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def validate_coco_root(root: str | os.PathLike | None, splits: Sequence[str] = ("train2017", "val2017")) -> Path:
    """Check the COCO directory layout without reading any JSON or image; returns the root as a Path.

    Meant for config validation, so a wrong ``data.root`` fails in a second, naming the missing path,
    instead of after the model was built.
    """
    if root is None or not str(root).strip():
        raise ValueError(f"data.root must be set for a COCO-format dataset ({EXPECTED_COCO_LAYOUT})")
    root = Path(str(root)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"COCO root not found: {root} ({EXPECTED_COCO_LAYOUT})")
    for split in splits:
        ann = annotation_file(root, split)
        if not ann.is_file():
            raise FileNotFoundError(f"annotation file not found: {ann} ({EXPECTED_COCO_LAYOUT})")
        if not (root / split).is_dir():
            raise FileNotFoundError(f"image directory not found: {root / split} ({EXPECTED_COCO_LAYOUT})")
    return root


def _quiet():
    # pycocotools prints progress to stdout; train.py's last stdout line must stay the result JSON.
    return contextlib.redirect_stdout(io.StringIO())


def coco_subset(coco: COCO, image_ids: Sequence[int]) -> COCO:
    """A COCO ground truth holding only ``image_ids`` (and their annotations), for COCOeval on a subset."""
    keep = set(int(i) for i in image_ids)
    dataset = {key: value for key, value in coco.dataset.items() if key not in ("images", "annotations")}
    dataset["images"] = [img for img in coco.dataset["images"] if img["id"] in keep]
    dataset["annotations"] = [ann for ann in coco.dataset.get("annotations", []) if ann["image_id"] in keep]
    dataset.setdefault("categories", [])
    subset = COCO()
    subset.dataset = dataset
    with _quiet():
        subset.createIndex()
    return subset


def ann_to_mask(coco: COCO, ann: dict) -> np.ndarray:
    """pycocotools' annToMask without its NumPy 2 DeprecationWarning (about its own __array__), which
    would otherwise be repeated for every mask of every image."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return coco.annToMask(ann)


def _clipped_xyxy(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


class CocoDetectionDataset(CocoDetection):
    """One split of a COCO-format dataset, yielding ``(image, target)`` ready for transforms v2.

    ``target``: ``boxes`` (tv_tensors.BoundingBoxes, XYXY pixels), ``labels`` (int64, 1..K),
    ``masks`` (tv_tensors.Mask uint8[N, H, W], only with ``with_masks``) and ``image_id``.

    * ``iscrowd=1`` annotations are left out (counted in ``stats["crowd_ignored"]``).
    * Boxes narrower or lower than one pixel after clipping to the image (zero-size ones included) are
      dropped (``stats["degenerate_dropped"]``); one pixel is also the minimum that transforms v2's
      SanitizeBoundingBoxes keeps, so nothing is dropped later without being counted.
    * ``train=True``: images with no annotation left are skipped (``stats["images_without_annotations"]``);
      ``train=False`` keeps them, since evaluation must see every image.
    * Image files are checked to exist here: strict raises FileNotFoundError naming the first missing
      path; non-strict leaves them out (``stats["missing_images"]``, ``missing_paths``).
    * An undecodable file at load time raises CorruptImageError (strict) or yields a CorruptSample.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        *,
        train: bool,
        with_masks: bool,
        strict: bool = True,
        transforms: Callable | None = None,
        category_ids: Sequence[int] | None = None,
    ) -> None:
        with _quiet():
            super().__init__(str(image_dir), str(ann_file), transforms=transforms)
        self.ann_file = str(ann_file)
        self.train = bool(train)
        self.with_masks = bool(with_masks)
        self.strict = bool(strict)
        # Sorted category ids -> labels 1..K (0 is the background in torchvision's detectors).
        self.category_ids = sorted(int(c) for c in (category_ids if category_ids is not None
                                                     else self.coco.getCatIds()))
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.stats: Counter = Counter()
        self._targets: dict[int, tuple[np.ndarray, np.ndarray, list[dict]]] = {}
        self.missing_paths: list[str] = []
        self.ids = self._usable_ids()

    def _path(self, image_id: int) -> str:
        return os.path.join(self.root, self.coco.imgs[image_id]["file_name"])

    def _kept_annotations(self, image_id: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        info = self.coco.imgs[image_id]
        width, height = int(info["width"]), int(info["height"])
        boxes, labels, anns = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                self.stats["crowd_ignored"] += 1
                continue
            if ann["category_id"] not in self._label_of:
                raise ValueError(
                    f"annotation {ann.get('id')} of image {image_id} in {self.ann_file} has category_id "
                    f"{ann['category_id']}, which is not among the categories {self.category_ids}"
                )
            x1, y1, x2, y2 = _clipped_xyxy(ann["bbox"], width, height)
            if x2 - x1 < 1 or y2 - y1 < 1:
                self.stats["degenerate_dropped"] += 1
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self._label_of[ann["category_id"]])
            anns.append(ann)
        return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64), anns)

    def _usable_ids(self) -> list[int]:
        present = []
        for image_id in self.ids:
            if os.path.isfile(self._path(image_id)):
                present.append(image_id)
            else:
                self.missing_paths.append(self._path(image_id))
        if self.missing_paths and self.strict:
            more = len(self.missing_paths) - 1
            raise FileNotFoundError(
                f"image file not found: {self.missing_paths[0]}"
                + (f" (and {more} more of the {len(self.ids)} images listed in {self.ann_file})" if more else "")
                + "; set data.strict=false to skip missing images"
            )
        self.stats["missing_images"] = len(self.missing_paths)
        kept = []
        for image_id in present:
            target = self._kept_annotations(image_id)
            if self.train and len(target[1]) == 0:
                self.stats["images_without_annotations"] += 1
                continue
            self._targets[image_id] = target
            kept.append(image_id)
        return kept

    @property
    def num_annotations(self) -> int:
        """Annotations that reach the targets of the images in ``ids``."""
        return sum(len(self._targets[i][1]) for i in self.ids)

    def group_ids(self) -> list[int]:
        """Aspect group per item (0: landscape or square, 1: portrait) from the JSON sizes, no decoding."""
        return [0 if self.coco.imgs[i]["width"] >= self.coco.imgs[i]["height"] else 1 for i in self.ids]

    def _mask(self, ann: dict, box: np.ndarray, height: int, width: int) -> np.ndarray:
        if ann.get("segmentation"):
            return ann_to_mask(self.coco, ann)
        # A box-only annotation: its box is the best mask there is.
        mask = np.zeros((height, width), dtype=np.uint8)
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        mask[y1:y2, x1:x2] = 1
        return mask

    def __getitem__(self, index: int) -> Any:
        image_id = self.ids[index]
        path = self._path(image_id)
        info = self.coco.imgs[image_id]
        try:
            image = load_rgb(path)
            if image.size != (int(info["width"]), int(info["height"])):
                # Boxes were clipped and masks are drawn at the JSON size: a different file would misalign them.
                raise CorruptImageError(path, f"size {image.size[0]}x{image.size[1]} differs from the "
                                              f"annotation's {info['width']}x{info['height']}")
        except CorruptImageError as exc:
            if self.strict:
                raise
            return CorruptSample(path, exc.reason)
        boxes, labels, anns = self._targets[image_id]
        height, width = image.height, image.width
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes.copy()), format="XYXY",
                                              canvas_size=(height, width)),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": int(image_id),
        }
        if self.with_masks:
            masks = [self._mask(ann, box, height, width) for ann, box in zip(anns, boxes)]
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked.astype(np.uint8, copy=False)))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
