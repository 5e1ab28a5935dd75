"""The segmentation data: the VOC and Cityscapes readers on tiny fixtures written in the official layouts,
transforms that keep image and mask aligned, the padded batches, bad pairs skipped and named (or stopping a
strict run), and the data keys' rules.

Every fixture is a handful of images of a few dozen pixels, written in tmp_path: the whole module runs in a few
seconds.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dynconv.config import ConfigError
from dynconv.config_checks import DATA_SECTION, check_section
from dynconv.data.errors import MissingFilesError, UnreadableImageError
from dynconv.tasks.segmentation import build_segmentation_data
from dynconv.tasks.segmentation.cityscapes import LABEL_ID_TO_TRAIN_ID
from dynconv.tasks.segmentation.collate import collate_segmentation
from dynconv.tasks.segmentation.transforms import build_segmentation_transforms
from dynconv.tasks.segmentation.voc import VOC_CLASSES, voc_palette

RECIPE = {"batch_size": 2, "eval_batch_size": 2, "drop_last": False}
PLAIN = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # normalised image = pixels / 255


# ----------------------------------------------------------------------------------------------- fixtures
def _image(path: Path, height: int, width: int, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)


def _palette_mask(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(labels.astype(np.uint8), mode="P")
    mask.putpalette(voc_palette())
    mask.save(path)


def _gray_mask(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def _labels(height: int, width: int, values=(0, 15, 255), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array(values, dtype=np.uint8), size=(height, width))


def _voc(root: Path, splits: dict[str, dict[str, tuple[int, int]]]) -> dict[str, np.ndarray]:
    """A VOC2012 folder: {split: {id: (height, width)}}; returns the labels written per id."""
    written = {}
    for split, images in splits.items():
        for number, (image_id, (height, width)) in enumerate(images.items()):
            _image(root / "JPEGImages" / f"{image_id}.jpg", height, width)
            written[image_id] = _labels(height, width, seed=number)
            _palette_mask(root / "SegmentationClass" / f"{image_id}.png", written[image_id])
        lists = root / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("".join(f"{image_id}\n" for image_id in images))
    return written


def _voc_cfg(root: Path, **extra) -> dict:
    return {"name": "voc", "root": str(root), "num_workers": 0, "strict": True, "crop_size": 16,
            "scale_range": [1.0, 1.0], "hflip": 0.0, **PLAIN, **extra}


def _data(cfg: dict, **recipe):
    return build_segmentation_data(cfg, {**RECIPE, **recipe}, rank=0, world_size=1, seed=0)


def _val_masks(data) -> list[torch.Tensor]:
    masks = []
    for _images, batch_masks, _skipped in data.val_loader:
        masks += list(batch_masks)
    return masks


# ----------------------------------------------------------------------------------------------- readers
def test_voc_reads_the_palette_indices_at_full_resolution(tmp_path):
    root = tmp_path / "VOC2012"
    written = _voc(root, {"train": {"2007_000032": (20, 24), "2007_000039": (18, 22)},
                          "val": {"2007_000033": (20, 30), "2007_000042": (14, 16)}})
    data = _data(_voc_cfg(root), eval_batch_size=1)
    assert (data.num_classes, data.ignore_index, data.class_names) == (21, 255, list(VOC_CLASSES))
    assert data.class_names[15] == "person"
    masks = _val_masks(data)
    assert [m.dtype for m in masks] == [torch.int64] * 2
    for mask, image_id in zip(masks, ("2007_000033", "2007_000042")):
        assert np.array_equal(mask.numpy(), written[image_id])  # indices, not palette colours; nothing resized
    images, masks, skipped = next(iter(data.train_loader))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32 and masks.shape == (2, 16, 16)
    assert skipped == []


def test_voc_augmented_set_from_a_split_name_or_deeplabs_list(tmp_path):
    root = tmp_path / "VOC2012"
    _voc(root, {"train": {"a": (12, 12)}, "val": {"v": (12, 12)}})
    for image_id in ("a", "b"):
        _image(root / "JPEGImages" / f"{image_id}.jpg", 12, 12)
        _gray_mask(root / "SegmentationClassAug" / f"{image_id}.png", np.full((12, 12), 7))  # plain grayscale
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("a\nb\n")
    (tmp_path / "deeplab_list.txt").write_text(
        "/JPEGImages/a.jpg /SegmentationClassAug/a.png\n\n/JPEGImages/b.jpg /SegmentationClassAug/b.png\n")
    for extra in ({"train_split": "train_aug"}, {"train_list": str(tmp_path / "deeplab_list.txt")}):
        data = _data(_voc_cfg(root, train_mask_dir="SegmentationClassAug", crop_size=12, **extra), batch_size=2)
        _images, masks, _ = next(iter(data.train_loader))
        assert data.stats["train_images"] == 2 and (masks == 7).all()
        assert _val_masks(data)[0].shape == (12, 12)  # val keeps the official SegmentationClass


def _cityscapes(root: Path, split: str, stems: list[str], labels: np.ndarray) -> None:
    for stem in stems:
        city = stem.split("_")[0]
        _image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", *labels.shape)
        _gray_mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", labels)


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path):
    every_id = np.array([*range(34), 255], dtype=np.uint8)  # 0..33 and -1 (license plate) as 255
    labels = np.tile(every_id, (4, 1))
    _cityscapes(tmp_path, "train", ["aachen_000000_000019", "bochum_000000_000313"], labels)
    _cityscapes(tmp_path, "val", ["frankfurt_000000_000294"], labels)
    cfg = {"name": "cityscapes", "root": str(tmp_path), "num_workers": 0, "crop_size": [4, 8],
           "scale_range": [1.0, 1.0], "hflip": 0.0, **PLAIN}
    data = _data(cfg)
    assert data.num_classes == 19 and data.class_names[0] == "road" and data.class_names[18] == "bicycle"
    (mask,) = _val_masks(data)
    expected = [LABEL_ID_TO_TRAIN_ID.get(int(v), 255) for v in every_id]
    assert mask[0].tolist() == expected
    assert expected[7] == 0 and expected[26] == 13 and expected[33] == 18 and expected[0] == expected[6] == 255
    assert data.stats == {"train_images": 2, "val_images": 1, "missing_pairs": 0}


def test_layout_errors_name_data_root_and_the_layout(tmp_path):
    import dynconv.tasks  # noqa: F401  (registers the datasets)
    from dynconv.data.datasets import DATASETS

    root = tmp_path / "VOCdevkit"
    _voc(root / "VOC2012", {"train": {"a": (8, 8)}, "val": {"b": (8, 8)}})
    cases = [("voc", {"root": str(root)}, f"pass data.root={root / 'VOC2012'}"),
             ("voc", {"root": str(root / "VOC2012"), "val_split": "test"}, "no val list"),
             ("voc", {"root": str(root / "VOC2012"), "train_mask_dir": "SegmentationClassAug"},
              "(data.train_mask_dir)"),
             ("voc", {"root": None}, "data.root is not set"),
             ("cityscapes", {"root": str(tmp_path)}, "leftImg8bit/train")]
    for name, cfg, expected in cases:
        with pytest.raises(ConfigError) as info:
            DATASETS.get(name).check({"name": name, **cfg})
        assert expected in str(info.value) and "layout" in str(info.value), str(info.value)
    assert DATASETS.get("voc").recognise(root / "VOC2012") and not DATASETS.get("cityscapes").recognise(root)


# ---------------------------------------------------------------------------------------------- transforms
def _encoded(height: int, width: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    """A mask of 10x10 blocks of labels 0..4 and an image whose grey level is 40 x label + 20."""
    blocks = np.random.default_rng(seed).integers(0, 5, size=(-(-height // 10), -(-width // 10)))
    labels = np.kron(blocks, np.ones((10, 10), dtype=np.int64))[:height, :width].astype(np.uint8)
    grey = (40 * labels.astype(np.int64) + 20).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1)), labels


def _decoded(image: torch.Tensor) -> torch.Tensor:
    return torch.round((image[0] * 255 - 20) / 40).to(torch.int64)  # with PLAIN normalisation


def test_scale_crop_and_flip_keep_image_and_mask_aligned():
    transform = build_segmentation_transforms({"crop_size": [40, 48], "scale_range": [0.5, 2.0], "hflip": 0.5,
                                               **PLAIN}, train=True)
    for seed in range(12):
        torch.manual_seed(seed)
        image, labels = _encoded(40, 56, seed)
        out_image, out_mask = transform(image, labels)
        assert out_image.shape == (3, 40, 48) and out_mask.shape == (40, 48) and out_mask.dtype == torch.uint8
        mask = out_mask.to(torch.int64)
        # Two pixels away from block edges (where bilinear blends neighbours and nearest neighbour rounds), the
        # image encodes exactly the mask's label; a shift of image against mask would break that everywhere.
        interior = mask != 255
        for shift in (1, 2, -1, -2):
            interior &= (mask == torch.roll(mask, shift, 0)) & (mask == torch.roll(mask, shift, 1))
        interior[[0, 1, -2, -1], :] = interior[:, [0, 1, -2, -1]] = False
        assert interior.sum() > 20
        assert torch.equal(_decoded(out_image)[interior], mask[interior]), seed
        # Labels stay labels: nearest-neighbour resizing never invents a value.
        assert set(torch.unique(mask).tolist()) <= {0, 1, 2, 3, 4, 255}


def test_flip_and_padding_exactly():
    image, labels = _encoded(10, 14, 3)
    flip = build_segmentation_transforms({"crop_size": [10, 14], "scale_range": [1.0, 1.0], "hflip": 1.0, **PLAIN},
                                         train=True)
    out_image, out_mask = flip(image, labels)
    assert np.array_equal(out_mask.numpy(), labels[:, ::-1])
    assert torch.equal(_decoded(out_image), torch.from_numpy(labels[:, ::-1].astype(np.int64)))
    # A crop larger than the image: padded at the bottom and right, mask with 255, image with the mean (0 after
    # normalisation).
    half = {"mean": [0.5] * 3, "std": [0.5] * 3}
    pad = build_segmentation_transforms({"crop_size": 16, "scale_range": [1.0, 1.0], "hflip": 0.0, **half}, train=True)
    out_image, out_mask = pad(image, labels)
    assert out_mask.shape == (16, 16)
    assert np.array_equal(out_mask[:10, :14].numpy(), labels)
    assert (out_mask[10:, :] == 255).all() and (out_mask[:, 14:] == 255).all()
    assert (out_image[:, 10:, :] == 0).all() and (out_image[:, :, 14:] == 0).all()
    assert (out_image[:, :10, :14] != 0).all()


def test_evaluation_keeps_the_resolution_unless_val_size_is_set():
    image, labels = _encoded(30, 42, 1)
    out_image, out_mask = build_segmentation_transforms(PLAIN, train=False)(image, labels)
    assert np.array_equal(out_mask.numpy(), labels) and torch.equal(_decoded(out_image), out_mask.to(torch.int64))
    out_image, out_mask = build_segmentation_transforms({**PLAIN, "val_size": 15}, train=False)(image, labels)
    assert out_image.shape == (3, 15, 21) and out_mask.shape == (15, 21)
    assert set(torch.unique(out_mask).tolist()) <= set(np.unique(labels).tolist())


def test_the_collate_pads_images_with_0_and_masks_with_255():
    samples = [(torch.ones(3, 4, 6), torch.full((4, 6), 2, dtype=torch.uint8)),
               (torch.ones(3, 5, 3), torch.full((5, 3), 1, dtype=torch.uint8))]
    images, masks, skipped = collate_segmentation(samples)
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 5, 6) and masks.dtype == torch.int64
    assert skipped == []
    assert (images[0, :, :4, :6] == 1).all() and (images[0, :, 4:] == 0).all()
    assert (masks[0, :4] == 2).all() and (masks[0, 4:] == 255).all()
    assert (masks[1, :, :3] == 1).all() and (masks[1, :, 3:] == 255).all() and (images[1, :, :, 3:] == 0).all()


# ---------------------------------------------------------------------------------------------- bad input
def _voc_with_bad_pairs(root: Path) -> dict[str, Path]:
    _voc(root, {"train": {"good1": (12, 12), "good2": (12, 12)},
                "val": {"ok": (12, 12), "small": (12, 12), "label": (12, 12), "rgb": (12, 12), "cut": (12, 12)}})
    bad = {"small": root / "SegmentationClass" / "small.png", "label": root / "SegmentationClass" / "label.png",
           "rgb": root / "SegmentationClass" / "rgb.png", "cut": root / "JPEGImages" / "cut.jpg"}
    _palette_mask(bad["small"], np.zeros((10, 12)))  # not the size of its image
    _palette_mask(bad["label"], np.full((12, 12), 42))  # no VOC class has index 42
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(bad["rgb"])  # a colour rendering, not indices
    bad["cut"].write_bytes(bad["cut"].read_bytes()[:40])  # a truncated JPEG
    return bad


def test_bad_pairs_are_skipped_and_named(tmp_path, caplog):
    bad = _voc_with_bad_pairs(tmp_path)
    data = _data(_voc_cfg(tmp_path, strict=False), eval_batch_size=5)
    with caplog.at_level(logging.WARNING, logger="dynconv"):
        (images, masks, skipped), = list(data.val_loader)
    assert images.shape[0] == masks.shape[0] == 1  # only "ok" is left
    assert sorted(skipped) == sorted(str(path) for path in bad.values())
    reasons = {path: path.reason for path in skipped}
    assert "the mask is 12x10 pixels but its image" in reasons[str(bad["small"])]
    assert "42" in reasons[str(bad["label"])] and "0..20" in reasons[str(bad["label"])]
    assert "mode RGB" in reasons[str(bad["rgb"])]
    assert "skipped 4 undecodable image/mask pair(s)" in caplog.text and str(bad["label"]) in caplog.text


def test_a_strict_run_stops_naming_the_file(tmp_path):
    bad = _voc_with_bad_pairs(tmp_path)
    data = _data(_voc_cfg(tmp_path, strict=True, max_val_samples=None), eval_batch_size=1)
    with pytest.raises(UnreadableImageError) as info:
        list(data.val_loader)
    assert any(str(path) in str(info.value) for path in bad.values()), str(info.value)
    assert "corrupt or unreadable image or mask file" in str(info.value) and "data.strict=false" in str(info.value)


def test_missing_files_stop_a_strict_build_and_are_left_out_otherwise(tmp_path, caplog):
    _voc(tmp_path, {"train": {"a": (8, 8), "b": (8, 8)}, "val": {"c": (8, 8)}})
    (tmp_path / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(MissingFilesError, match=str(tmp_path / "SegmentationClass" / "b.png")):
        _data(_voc_cfg(tmp_path, crop_size=8))
    with caplog.at_level(logging.WARNING, logger="dynconv"):
        data = _data(_voc_cfg(tmp_path, crop_size=8, strict=False))
    assert data.stats["train_images"] == 1 and data.stats["missing_pairs"] == 1
    assert "left out 1 image/mask pair(s)" in caplog.text and "b.png" in caplog.text


# ------------------------------------------------------------------------------------------ loader details
def test_val_is_sharded_and_training_is_seeded(tmp_path):
    root = tmp_path / "VOC2012"
    _voc(root, {"train": {f"t{i}": (12, 12) for i in range(6)}, "val": {f"v{i}": (8 + i, 10) for i in range(5)}})
    cfg = _voc_cfg(root, crop_size=10, scale_range=[0.5, 2.0], hflip=0.5)
    shards = [build_segmentation_data(cfg, {**RECIPE, "eval_batch_size": 1}, rank=rank, world_size=2, seed=0)
              for rank in (0, 1)]
    heights = sorted(mask.shape[0] for data in shards for mask in _val_masks(data))
    assert heights == [8, 9, 10, 11, 12]  # each image once over both ranks
    first, again = ([torch.cat([m for _, m, _ in _data(cfg).train_loader])] for _ in range(2))
    assert torch.equal(first[0], again[0])  # the same (seed, epoch): the same scales, crops and flips


# ------------------------------------------------------------------------------------------------ the rules
@pytest.fixture(scope="module")
def composed():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dynconv.config import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    config_dir = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(version_base="1.3", config_dir=config_dir):
        configs = {option: OmegaConf.to_container(compose("train", overrides=[f"data={option}"]), resolve=True,
                                                  throw_on_missing=False)
                   for option in ("voc", "cityscapes", "toy_seg")}
    GlobalHydra.instance().clear()
    return configs


REJECTED = [
    ("toy_seg", "crop_size", 0, "an integer in [1, 8192] (a square) or [height, width]"),
    ("toy_seg", "crop_size", [64], "an integer in [1, 8192] (a square) or [height, width]"),
    ("toy_seg", "crop_size", [0, 64], "an integer in [1, 8192] (a square) or [height, width]"),
    ("voc", "crop_size", 512.5, "an integer in [1, 8192]"),
    ("toy_seg", "scale_range", [2, 1], "a pair [a, b] with 0 < a <= b <= 4"),
    ("toy_seg", "scale_range", [0, 1], "a pair [a, b] with 0 < a <= b <= 4"),
    ("cityscapes", "scale_range", [0.5, 20], "a pair [a, b] with 0 < a <= b <= 4"),
    ("voc", "val_size", 0, "integers in [1, 8192] or null"),
    ("voc", "train_list", "", "a non-empty string"),
    ("voc", "train_mask_dir", None, "a non-empty string"),
    ("voc", "num_classes", 20, "null, 21 (data=voc has 21 classes)"),
    ("cityscapes", "num_classes", 34, "null, 19 (data=cityscapes has 19 classes)"),
    ("toy_seg", "num_classes", 3, "null, 4 (data=toy_seg has 4 classes)"),
    ("toy_seg", "hflip", 2, "a number in [0.0, 1.0]"),
]


@pytest.mark.parametrize(("option", "key", "value", "allowed"), REJECTED, ids=lambda v: repr(v)[:30])
def test_a_wrong_data_value_is_refused_naming_the_key(composed, option, key, value, allowed):
    changed = copy.deepcopy(composed[option])
    changed["data"][key] = value
    with pytest.raises(ConfigError) as info:
        check_section(changed, DATA_SECTION, ConfigError)
    assert str(info.value).startswith(f"data.{key}={value!r} is invalid; allowed values: "), str(info.value)
    assert allowed in str(info.value), str(info.value)


def test_the_shipped_values_and_boundaries_pass(composed):
    for option in ("voc", "cityscapes", "toy_seg"):
        check_section(composed[option], DATA_SECTION, ConfigError)
    changed = copy.deepcopy(composed["cityscapes"])
    changed["data"].update(crop_size=[512, 1024], scale_range=[1.0, 1.0], val_size=1024)
    check_section(changed, DATA_SECTION, ConfigError)
    assert composed["toy_seg"]["recipe"]["sched"] == "poly"  # data=toy_seg picks its recipe


def test_poly_schedule_follows_the_papers_formula(compose_cfg):
    """sched=poly: lr x (1 - t/T)^power per iteration, recipe.decay_rate the power (0.9)."""
    from torch import nn

    from dynconv.config import validate_recipe_config
    from dynconv.engine.training_run import build_optimizer_and_scheduler

    cfg = compose_cfg(["recipe=toy_seg", "recipe.warmup_epochs=0", "recipe.epochs=2"])
    validate_recipe_config(cfg)
    optimizer, scheduler = build_optimizer_and_scheduler(nn.Linear(2, 2), cfg.recipe, 10)
    total, peak = 20, cfg.recipe.lr
    for step in (0, 5, 10, 19):
        scheduler.step_update(step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(peak * (1 - step / total) ** 0.9), step
