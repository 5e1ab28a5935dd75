"""COCO-format detection dataset: contiguous labels, counted filtering, named missing/corrupt files.

Why a subclass of torchvision's ``CocoDetection``: it already loads the annotation JSON through pycocotools
and maps image ids to files; what it lacks is what training needs and what hides data problems when
missing: crowd annotations and zero-size boxes must not reach the loss, images left without any annotation
are useless in training (but still part of the evaluation), category ids (1..90 with holes in COCO) must
become contiguous labels, and a missing or corrupt file must be reported by its path.  Every dropped item
is counted in ``stats`` so the build can log what was left out instead of silently training on less.

What the annotation file says is checked when the dataset is built, before training: an unreadable file,
images that are missing, empty (0 bytes) or of zero area, and annotations of a category the file does not
list. ``strict`` stops on the first such problem with a DataError naming the file; non-strict leaves the
item out, counts it and names it in a warning. A split with no usable image at all is an error either way.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from stat import S_ISREG
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection

from dynconv.data.errors import DataError, MissingFilesError
from dynconv.data.images import CorruptImageError, CorruptSample, load_rgb
from dynconv.data.json_files import check_json_object_start, describe_json_error

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
    """Check the COCO directory layout, reading only the first bytes of each annotation file (it must start a
    JSON object) and no image; returns the root as a Path.

    Meant for config validation, so a wrong ``data.root`` or an annotation file that is an HTML page or an
    archive fails in a second, naming the path, instead of after the model was built.
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
        try:
            check_json_object_start(ann)
        except ValueError as error:
            raise ValueError(f"{error}; {_REPLACE_ANNOTATIONS} ({EXPECTED_COCO_LAYOUT})") from None
        if not (root / split).is_dir():
            raise FileNotFoundError(f"image directory not found: {root / split} ({EXPECTED_COCO_LAYOUT})")
    return root


_REPLACE_ANNOTATIONS = ("expected a COCO instances file (a JSON object with \"images\", \"annotations\" and "
                        "\"categories\"); replace it with the dataset's annotation file of that name")
_STRICT_HINT = "or set data.strict=false to leave such items out (they are counted and named in a warning)"


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
    * Each image is checked here, from the JSON and one ``stat`` (no decoding): a missing file
      (``stats["missing_images"]``, ``missing_paths``), an empty one (``empty_image_files``) and an ``images``
      entry of zero area (``zero_size_images``). Strict raises (MissingFilesError, a FileNotFoundError, for
      missing files; DataError otherwise) naming the first one; non-strict leaves them out (``skipped``
      names them). An annotation whose category is not in ``categories`` is the same kind of problem
      (``stats["unknown_category_dropped"]``).
    * An unreadable annotation file, or one whose images are all unusable, is a DataError either way.
    * An undecodable file at load time raises CorruptImageError (strict) or yields a CorruptSample
      (``defer_corrupt=True``: always a CorruptSample, for a loader that applies strictness itself).
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
        defer_corrupt: bool = False,
    ) -> None:
        try:
            with _quiet():
                super().__init__(str(image_dir), str(ann_file), transforms=transforms)
        except (ValueError, AssertionError, KeyError, TypeError) as error:  # json's and pycocotools' failures
            raise DataError(f"cannot read the annotation file {ann_file}: {describe_json_error(error)}; "
                            f"{_REPLACE_ANNOTATIONS} ({EXPECTED_COCO_LAYOUT})") from None
        self.ann_file = str(ann_file)
        self.train = bool(train)
        self.with_masks = bool(with_masks)
        self.strict = bool(strict)
        self.defer_corrupt = bool(defer_corrupt)
        # Sorted category ids -> labels 1..K (0 is the background in torchvision's detectors).
        self.category_ids = sorted(int(c) for c in (category_ids if category_ids is not None
                                                     else self.coco.getCatIds()))
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.stats: Counter = Counter()
        self._targets: dict[int, tuple[np.ndarray, np.ndarray, list[dict]]] = {}
        # stats key -> descriptions of what was left out (non-strict), for the warning.
        self.skipped: dict[str, list[str]] = {}
        self._problems: list[tuple[str, str, type[DataError]]] = []
        self.ids = self._usable_ids()

    @property
    def missing_paths(self) -> list[str]:
        return self.skipped.get("missing_images", [])

    def _problem(self, key: str, description: str, fix: str, error: type[DataError] = DataError) -> None:
        """Record an unusable item under `key`; strict mode raises for the first one after the whole scan."""
        self.stats[key] += 1
        self.skipped.setdefault(key, []).append(description)
        self._problems.append((description, fix, error))

    def _raise_if_strict(self) -> None:
        if not self.strict or not self._problems:
            return
        description, fix, error = self._problems[0]
        more = len(self._problems) - 1
        counted = f" (and {more} more problem(s) in the same file)" if more else ""
        raise error(f"{description}{counted}; {fix}, {_STRICT_HINT}")

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
            if ann.get("category_id") not in self._label_of:
                self._problem("unknown_category_dropped",
                              f"annotation {ann.get('id')} (image {image_id}) of {self.ann_file} has category_id "
                              f"{ann.get('category_id')!r}, which is not among its categories {self.category_ids}",
                              "add that category to \"categories\" or correct the annotation")
                continue
            bbox = ann.get("bbox")
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in bbox)):
                self._problem("malformed_boxes_dropped",
                              f"annotation {ann.get('id')} (image {image_id}) of {self.ann_file} has bbox "
                              f"{bbox!r}", "give it [x, y, width, height] in pixels")
                continue
            x1, y1, x2, y2 = _clipped_xyxy(bbox, width, height)
            if x2 - x1 < 1 or y2 - y1 < 1:
                self.stats["degenerate_dropped"] += 1
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self._label_of[ann["category_id"]])
            anns.append(ann)
        return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64), anns)

    def _image_problem(self, image_id: int) -> tuple[str, str, str, type[DataError]] | None:
        """(stats key, description, fix, error type) of an image entry that cannot be used, from the JSON and
        one stat of its file; None when it is fine."""
        info = self.coco.imgs[image_id]
        listed = f"image {image_id} of {self.ann_file}"
        size = (info.get("width"), info.get("height"))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in size):
            description = f"{listed} has width {size[0]!r} and height {size[1]!r} (a zero-area image holds no box)"
            return "zero_size_images", description, "correct its \"width\" and \"height\"", DataError
        if not info.get("file_name"):
            return "missing_images", f"{listed} has no file_name", "add it", MissingFilesError
        path = self._path(image_id)
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            return ("missing_images", f"image file not found: {path} ({listed})",
                    f"check that {self.root} holds the images the file lists", MissingFilesError)
        if stat.st_size == 0:
            return ("empty_image_files", f"image file {path} is empty (0 bytes; {listed})",
                    "replace it with the dataset's file", DataError)
        return None

    def _usable_ids(self) -> list[int]:
        if not self.ids:
            raise DataError(f"{self.ann_file} lists no images; {_REPLACE_ANNOTATIONS}")
        present = []
        for image_id in self.ids:
            problem = self._image_problem(image_id)
            if problem is None:
                present.append(image_id)
            else:
                self._problem(*problem)
        if not present:  # nothing to skip to: an error whatever data.strict says
            fix = (f"data.root or the data.*_split names probably point at the wrong folder: the images are "
                   f"expected in {self.root}" if self.stats["missing_images"] == len(self.ids)
                   else "correct the annotation file or the image files")
            raise DataError(f"none of the {len(self.ids)} images listed in {self.ann_file} can be used (the "
                            f"first: {self._problems[0][0]}); {fix}")
        self.stats["missing_images"] = len(self.missing_paths)
        kept = []
        for image_id in present:
            target = self._kept_annotations(image_id)
            if self.train and len(target[1]) == 0:
                self.stats["images_without_annotations"] += 1
                continue
            self._targets[image_id] = target
            kept.append(image_id)
        self._raise_if_strict()
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
            if self.strict and not self.defer_corrupt:
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
