"""CIFAR-100 from its python release (Krizhevsky 2009): the dataset of Weight Excitation's Sec. 4.3 / Table 6.

The release (`cifar-100-python.tar.gz`, unpacked) is three pickles: `train` (50,000 images) and `test` (10,000),
dicts with b"data" (uint8, N x 3072: 1,024 red, then green, then blue values of a 32 x 32 image, row-major) and
b"fine_labels" (N ints in 0..99), and `meta` with b"fine_label_names". `data.root` is the folder that holds
`cifar-100-python/` or the three files themselves; nothing is downloaded. The test split is the validation split
(the paper reports test accuracy, as is usual for CIFAR).

Why not torchvision's CIFAR100: it checks md5 sums of the whole release and its errors name neither
`data.root` nor the expected files. Reading the pickles here is a few lines, and a wrong file fails at once,
naming it. The pickles are untrusted input (plain `pickle.load` runs whatever code a crafted file names), so
they go through `dynconv.data.safe_pickle`, which rebuilds only numpy arrays and builtin containers.

Augmentation is CIFAR's own (the recipe of the paper's [42], bearpaw/pytorch-classification): zero-pad
`data.crop_padding` pixels, take a random 32 x 32 crop, flip horizontally with `recipe.aug.hflip`. timm's
ImageNet pipeline (RandomResizedCrop, ...) does not apply, so the other `recipe.aug` transform keys are unused
(Mixup/CutMix, applied on batches by the task, still are).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from dynconv.data.errors import DataError
from dynconv.data.safe_pickle import UnsafePickleError, load_data_pickle

__all__ = ["CIFAR100_FILES", "CIFAR100_LAYOUT", "Cifar100", "cifar_transforms", "locate_cifar100"]

CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_LAYOUT = ("expected the CIFAR-100 python release: DIR/cifar-100-python/{train,test,meta} or "
                   "DIR/{train,test,meta}, pickles with b'data' (uint8, N x 3072) and b'fine_labels'")
SIDE = 32
PIXELS = 3 * SIDE * SIDE


def locate_cifar100(root: str | Path) -> Path:
    """The folder holding train, test and meta under `root`; FileNotFoundError naming what is missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root} ({CIFAR100_LAYOUT})")
    for folder in (root / "cifar-100-python", root):
        if all((folder / name).is_file() for name in CIFAR100_FILES):
            return folder
    folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    missing = ", ".join(str(folder / name) for name in CIFAR100_FILES if not (folder / name).is_file())
    raise FileNotFoundError(f"CIFAR-100 files missing: {missing} ({CIFAR100_LAYOUT})")


_REPLACE = "replace it with the file of the same name from cifar-100-python.tar.gz"


def _load(path: Path) -> dict:
    try:
        content = load_data_pickle(path, encoding="bytes")
    except UnsafePickleError as error:
        raise DataError(f"{error} ({CIFAR100_LAYOUT})") from None
    except Exception as error:  # noqa: BLE001 - unpickling a wrong file raises many unrelated types
        raise DataError(f"{path} is not a CIFAR pickle ({type(error).__name__}: {error}); {_REPLACE} "
                        f"({CIFAR100_LAYOUT})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, not a dict; {_REPLACE} ({CIFAR100_LAYOUT})")
    return content


def _field(content: dict, key: str, path: Path) -> Any:
    # The release's pickles are Python 2 dicts: bytes keys when read with encoding="bytes"; accept str keys too.
    for candidate in (key.encode(), key):
        if candidate in content:
            return content[candidate]
    raise DataError(f"{path} has no b'{key}' entry; {_REPLACE} ({CIFAR100_LAYOUT})")


def read_split(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """Images as N x 32 x 32 x 3 uint8 (HWC, what PIL expects) and their fine labels; DataError naming the file."""
    content = _load(path)
    data = np.asarray(_field(content, "data", path))
    labels = [int(label) for label in _field(content, "fine_labels", path)]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 N x {PIXELS}; {_REPLACE}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} fine_labels for {len(data)} images; {_REPLACE}")
    if labels and not 0 <= min(labels) <= max(labels) < num_classes:
        raise DataError(f"{path}: fine_labels outside 0..{num_classes - 1} "
                        f"(the meta file names {num_classes} classes); {_REPLACE}")
    return data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), labels


def read_class_names(path: Path) -> list[str]:
    names = _field(_load(path), "fine_label_names", path)
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


class Cifar100(Dataset):
    """One split ("train" or "test") of the release in `folder` (see `locate_cifar100`): (image, label) pairs,
    the image a PIL RGB image passed through `transform`. `classes` as torchvision's ImageFolder has them."""

    def __init__(self, folder: str | Path, split: str, transform: Callable | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}; allowed values: train, test")
        folder = Path(folder)
        self.classes = read_class_names(folder / "meta")
        self.images, self.targets = read_split(folder / split, len(self.classes))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


def cifar_transforms(data_cfg: Mapping[str, Any], aug_cfg: Mapping[str, Any], is_training: bool) -> Callable:
    """Training: [resize] + pad-and-crop + flip; evaluation: [resize]; then tensor + normalisation.

    A resize comes first only when data.image_size is not CIFAR's 32 (an ImageNet-resolution backbone)."""
    size = int(data_cfg.get("image_size", SIDE))
    steps: list[Callable] = []
    if size != SIDE:
        interpolation = T.InterpolationMode(str(data_cfg.get("interpolation", "bilinear") or "bilinear"))
        steps.append(T.Resize(size, interpolation=interpolation))
    if is_training:
        padding = int(data_cfg.get("crop_padding", 4) or 0)
        flip = float(aug_cfg.get("hflip", 0.5) or 0.0)
        steps += [T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip(flip)]
    mean, std = ([float(v) for v in data_cfg.get(key)] for key in ("mean", "std"))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)
