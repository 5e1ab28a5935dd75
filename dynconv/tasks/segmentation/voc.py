"""PASCAL VOC 2012 segmentation in its release layout, optionally with the augmented training set (SBD).

The layout (Everingham et al., "The PASCAL Visual Object Classes Challenge 2012" development kit; `data.root`
is the VOC2012 folder of VOCdevkit):

    JPEGImages/<id>.jpg                           every image
    SegmentationClass/<id>.png                    palette PNG: pixel value = class index 0..20, 255 = boundary
    ImageSets/Segmentation/{train,val,trainval}.txt   one <id> per line (1,464 train / 1,449 val)

The augmented set (Hariharan et al., "Semantic contours from inverse detectors", ICCV 2011: SBD's 10,582
training images, as DeepLab and DeepLabV3Plus-Pytorch use it) adds `SegmentationClassAug/<id>.png` (plain
grayscale PNGs of the same indices) and a list of ids, usually `ImageSets/Segmentation/train_aug.txt`:
`data.train_split=train_aug data.train_mask_dir=SegmentationClassAug`. A list kept elsewhere is
`data.train_list=FILE`, with either one id per line or DeepLab's two columns `/JPEGImages/<id>.jpg
/SegmentationClassAug/<id>.png` (paths relative to data.root). Evaluation always reads the official
`SegmentationClass` masks of `data.val_split`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from dynconv.data.errors import DataError

__all__ = ["VOC_CLASSES", "VOC_LAYOUT", "looks_like_voc", "validate_voc_root", "voc_list_file", "voc_palette",
           "voc_split_pairs"]

# The 20 object classes of the challenge in their index order, after the background (index 0).
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
LIST_DIR = Path("ImageSets") / "Segmentation"
VOC_LAYOUT = ("the VOC2012 layout DIR/JPEGImages/<id>.jpg, DIR/SegmentationClass/<id>.png, "
              "DIR/ImageSets/Segmentation/<split>.txt, DIR being VOCdevkit/VOC2012")


def voc_palette() -> list[int]:
    """The development kit's colour map (its VOClabelcolormap.m) as a flat PIL palette of 256 RGB triples: the
    bits of an index are dealt out to R, G and B, most significant bit first (1 = dark red, 255 = cream)."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        bits = index
        for shift in range(7, -1, -1):
            red |= (bits & 1) << shift
            green |= ((bits >> 1) & 1) << shift
            blue |= ((bits >> 2) & 1) << shift
            bits >>= 3
        palette += [red, green, blue]
    return palette


def _settings(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "train_split": str(data_cfg.get("train_split") or "train"),
        "val_split": str(data_cfg.get("val_split") or "val"),
        "train_list": data_cfg.get("train_list") or None,
        "train_mask_dir": str(data_cfg.get("train_mask_dir") or MASK_DIR),
    }


def voc_list_file(root: Path, data_cfg: Mapping[str, Any], which: str) -> Path:
    """The list of ids (or of DeepLab's path pairs) of the training (`which="train"`) or evaluation split."""
    settings = _settings(data_cfg)
    if which == "train" and settings["train_list"]:
        path = Path(str(settings["train_list"])).expanduser()
        return path if path.is_absolute() else root / path
    return root / LIST_DIR / f"{settings[f'{which}_split']}.txt"


def _under_root(root: Path, text: str) -> Path:
    # DeepLab's lists write "/JPEGImages/x.jpg": rooted at the dataset folder, not at the file system's root.
    return root / text.lstrip("/")


def voc_split_pairs(root: Path, data_cfg: Mapping[str, Any], which: str) -> list[tuple[Path, Path]]:
    """The (image, mask) paths of the training (`which="train"`) or evaluation split the config names."""
    root = Path(root)
    list_file = voc_list_file(root, data_cfg, which)
    mask_dir = root / (_settings(data_cfg)["train_mask_dir"] if which == "train" else MASK_DIR)
    try:
        lines = list_file.read_text().splitlines()
    except OSError as error:
        raise DataError(f"cannot read the {which} list {list_file} ({error.strerror or error}); {VOC_LAYOUT}") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if len(fields) == 1:
            pairs.append((root / IMAGE_DIR / f"{fields[0]}.jpg", mask_dir / f"{fields[0]}.png"))
        elif len(fields) == 2:
            pairs.append((_under_root(root, fields[0]), _under_root(root, fields[1])))
        elif fields:
            raise DataError(f"{list_file}, line {number}: {line.strip()!r} is neither an image id nor DeepLab's "
                            "'<image path> <mask path>'")
    if not pairs:
        raise DataError(f"the {which} list {list_file} names no image; {VOC_LAYOUT}")
    return pairs


def looks_like_voc(folder: Path) -> bool:
    """JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/; nothing is read."""
    return all((folder / name).is_dir() for name in (IMAGE_DIR, MASK_DIR, LIST_DIR))


def validate_voc_root(root: str | Path, data_cfg: Mapping[str, Any]) -> Path:
    """Check the layout the config needs (folders and list files, no image opened); returns the root.
    FileNotFoundError naming what is missing and the expected layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root} ({VOC_LAYOUT})")
    if not looks_like_voc(root) and looks_like_voc(root / "VOC2012"):
        raise FileNotFoundError(f"{root} is the VOCdevkit folder; pass data.root={root / 'VOC2012'} ({VOC_LAYOUT})")
    settings = _settings(data_cfg)
    for name in (IMAGE_DIR, MASK_DIR, settings["train_mask_dir"]):
        if not (root / name).is_dir():
            extra = " (data.train_mask_dir)" if name == settings["train_mask_dir"] != MASK_DIR else ""
            raise FileNotFoundError(f"no folder {root / name}{extra} ({VOC_LAYOUT})")
    for which in ("train", "val"):
        list_file = voc_list_file(root, data_cfg, which)
        if not list_file.is_file():
            key = "data.train_list" if which == "train" and settings["train_list"] else f"data.{which}_split"
            raise FileNotFoundError(f"no {which} list {list_file} ({key}; {VOC_LAYOUT})")
    return root
