"""ImageFolder that always yields RGB, names bad files, and checks the layout early.

Why: real-world image collections contain grayscale/CMYK/RGBA/palette files and
the occasional truncated or empty file.  torchvision's ImageFolder would either
hand mixed channel counts to the model or die deep inside a worker with an
error that does not say which file was at fault.  Here every image is forced
to RGB, decode failures name the file (`dynconv.data.images`), and a non-strict
mode lets training continue while still reporting what was skipped
(`dynconv.data.collate`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from dynconv.data.images import CorruptImageError, CorruptSample, load_rgb

__all__ = ["RobustImageFolder", "validate_imagefolder_root", "EXPECTED_LAYOUT"]

EXPECTED_LAYOUT = (
    "expected the ImageNet layout DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg "
    f"(image extensions: {', '.join(IMG_EXTENSIONS)})"
)


def _image_files_exist(class_dir: Path) -> bool:
    # Same walk as torchvision's make_dataset (recursive, follows links), but
    # stops at the first hit so validating ImageNet stays cheap.
    for _dirpath, _dirnames, filenames in os.walk(class_dir, followlinks=True):
        if any(has_file_allowed_extension(name, IMG_EXTENSIONS) for name in filenames):
            return True
    return False


def _class_names(split_dir: Path) -> list[str]:
    """Validate one split directory and return its sorted class names."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder split not found: {split_dir} ({EXPECTED_LAYOUT})")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {split_dir} ({EXPECTED_LAYOUT})")
    empty = [name for name in classes if not _image_files_exist(split_dir / name)]
    if empty:
        shown = ", ".join(str(split_dir / name) for name in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise FileNotFoundError(f"class folders without images: {shown}{more} ({EXPECTED_LAYOUT})")
    return classes


def validate_imagefolder_root(root: str | os.PathLike, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Check the directory layout of a dataset root without opening any image.

    Meant to run before a training run writes anything, so a typo in the data
    path fails in a second instead of after building the model.  Also checks
    that all splits have the same classes: ImageFolder numbers classes by
    sorted folder name, so a class missing from one split would silently shift
    every label after it.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root} ({EXPECTED_LAYOUT})")
    per_split = {split: _class_names(root / split) for split in splits}
    reference_split, reference = next(iter(per_split.items()))
    for split, classes in per_split.items():
        if classes != reference:
            only_ref = sorted(set(reference) - set(classes))[:5]
            only_this = sorted(set(classes) - set(reference))[:5]
            raise ValueError(
                f"class folders differ between {root / reference_split} and {root / split}: "
                f"only in {reference_split}: {only_ref}, only in {split}: {only_this}"
            )


class RobustImageFolder(ImageFolder):
    """``ImageFolder`` over one split directory (e.g. ``DIR/train``) that always yields RGB.

    strict=True: an undecodable image raises :class:`CorruptImageError`.
    strict=False: ``__getitem__`` returns a :class:`CorruptSample` instead, which
    :func:`dynconv.data.collate.collate_skip_corrupt` drops and reports.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        strict: bool = True,
    ) -> None:
        # Our own checks first: torchvision's errors do not mention the expected layout.
        _class_names(Path(root).expanduser())
        super().__init__(
            str(Path(root).expanduser()),
            transform=transform,
            target_transform=target_transform,
            loader=load_rgb,
        )
        self.strict = bool(strict)

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except CorruptImageError as exc:
            if self.strict:
                raise
            return CorruptSample(path, exc.reason)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target
