"""ImageFolder that always yields RGB, names bad files, and checks the layout early.

Why: real-world image collections contain grayscale/CMYK/RGBA/palette files and
the occasional truncated or empty file.  torchvision's ImageFolder would either
hand mixed channel counts to the model or die deep inside a worker with an
error that does not say which file was at fault.  Here every image is forced
to RGB, decode failures name the file (`dynconv.data.images`), and a non-strict
mode lets training continue while still reporting what was skipped
(`dynconv.data.collate`).

A class folder without images stops a strict run at config validation (before anything is written); a
non-strict run keeps it as a class with no samples, so the labels of every other class stay the same in both
splits, and names it in a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from dynconv.data.images import CorruptImageError, CorruptSample, load_rgb

__all__ = ["RobustImageFolder", "validate_imagefolder_root", "EXPECTED_LAYOUT"]

log = logging.getLogger("dynconv")

EXPECTED_LAYOUT = (
    "expected the ImageNet layout DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg "
    f"(image extensions: {', '.join(IMG_EXTENSIONS)})"
)
# An evaluation (eval.py) reads the validation split alone.
EXPECTED_VAL_LAYOUT = (
    "an evaluation reads the val split only: expected DIR/val/<class>/*.jpg "
    f"(image extensions: {', '.join(IMG_EXTENSIONS)})"
)


def _image_files_exist(class_dir: Path) -> bool:
    # Same walk as torchvision's make_dataset (recursive, follows links), but
    # stops at the first hit so validating ImageNet stays cheap.
    for _dirpath, _dirnames, filenames in os.walk(class_dir, followlinks=True):
        if any(has_file_allowed_extension(name, IMG_EXTENSIONS) for name in filenames):
            return True
    return False


def _shown(paths: list[str]) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _empty_class_folders(split_dir: Path, classes: list[str]) -> list[str]:
    """The class folders of `split_dir` that hold no file with an image extension."""
    return [str(split_dir / name) for name in classes if not _image_files_exist(split_dir / name)]


def _class_names(split_dir: Path, strict: bool = True, layout: str = EXPECTED_LAYOUT) -> tuple[list[str], list[str]]:
    """Validate one split directory; return its sorted class names and the class folders without images.

    strict: a class folder without images is an error; non-strict accepts it unless every folder is empty."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder split not found: {split_dir} ({layout})")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {split_dir} ({layout})")
    empty = _empty_class_folders(split_dir, classes)
    if len(empty) == len(classes):
        raise FileNotFoundError(f"no images in any class folder of {split_dir} ({layout}); data.root "
                                "probably names the wrong folder")
    if empty and strict:
        raise FileNotFoundError(
            f"class folders without images: {_shown(empty)} ({layout}); add images to them, or set "
            "data.strict=false to keep them as classes without samples (their labels stay the same; a warning "
            "names them)")
    return classes, empty


def validate_imagefolder_root(root: str | os.PathLike, splits: tuple[str, ...] = ("train", "val"),
                              strict: bool = True) -> None:
    """Check the directory layout of a dataset root without opening any image.

    Meant to run before a training run writes anything, so a typo in the data
    path fails in a second instead of after building the model.  Also checks
    that all splits have the same classes: ImageFolder numbers classes by
    sorted folder name, so a class missing from one split would silently shift
    every label after it. `strict`: class folders without images are an error (non-strict: only when a whole
    split has no image).
    """
    root = Path(root).expanduser()
    layout = EXPECTED_VAL_LAYOUT if tuple(splits) == ("val",) else EXPECTED_LAYOUT
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root} ({layout})")
    per_split = {split: _class_names(root / split, strict, layout)[0] for split in splits}
    reference_split, reference = next(iter(per_split.items()))
    for split, classes in per_split.items():
        if classes != reference:
            only_ref = sorted(set(reference) - set(classes))[:5]
            only_this = sorted(set(classes) - set(reference))[:5]
            raise ValueError(
                f"class folders differ between {root / reference_split} and {root / split}: "
                f"only in {reference_split}: {only_ref}, only in {split}: {only_this}; every class needs a "
                "folder in each split (an empty one is accepted with data.strict=false)"
            )


class RobustImageFolder(ImageFolder):
    """``ImageFolder`` over one split directory (e.g. ``DIR/train``) that always yields RGB.

    strict=True: an undecodable image raises :class:`CorruptImageError`; a class folder without images is a
    FileNotFoundError. strict=False: ``__getitem__`` returns a :class:`CorruptSample` instead, which
    :func:`dynconv.data.collate.collate_skip_corrupt` drops and reports, and empty class folders are kept as
    classes without samples (``empty_classes`` names them).
    ``defer_corrupt=True``: a CorruptSample even when strict, for a loader that applies strictness in the
    main process (:class:`dynconv.data.checked_loader.CheckedDataLoader`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        strict: bool = True,
        defer_corrupt: bool = False,
    ) -> None:
        split_dir = Path(root).expanduser()
        # Our own checks first: torchvision's errors do not mention the expected layout.
        _classes, empty = _class_names(split_dir, strict)
        super().__init__(
            str(split_dir),
            transform=transform,
            target_transform=target_transform,
            loader=load_rgb,
            allow_empty=not strict,
        )
        self.strict = bool(strict)
        self.defer_corrupt = bool(defer_corrupt)
        self.empty_classes = empty
        if self.empty_classes:
            log.warning("%d class folder(s) without images, kept as classes without samples (data.strict=false): "
                        "%s", len(self.empty_classes), _shown(self.empty_classes))

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except CorruptImageError as exc:
            if self.strict and not self.defer_corrupt:
                raise
            return CorruptSample(path, exc.reason)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target
