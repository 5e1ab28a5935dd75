"""RobustImageFolder: colour-mode normalisation, corrupt files, layout errors."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

from dynconv.data import CorruptImageError, CorruptSample, collate_skip_corrupt
from dynconv.tasks.classification.image_folder import RobustImageFolder, validate_imagefolder_root

SIZE = 12


def _rgb(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _jpeg_bytes(seed: int, size: int = SIZE) -> bytes:
    buf = io.BytesIO()
    _rgb(seed).resize((size, size)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_mode_zoo(class_dir: Path) -> None:
    """One file per awkward colour mode."""
    class_dir.mkdir(parents=True, exist_ok=True)
    _rgb(0).convert("L").save(class_dir / "gray.png")
    _rgb(1).convert("CMYK").save(class_dir / "cmyk.jpg", format="JPEG")
    rgba = _rgb(2).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(class_dir / "rgba.png")
    _rgb(3).convert("P", palette=Image.Palette.ADAPTIVE).save(class_dir / "palette.png")
    _rgb(4).convert("1").save(class_dir / "bilevel.png")
    sixteen = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 400).astype(np.uint16)
    Image.fromarray(sixteen).save(class_dir / "gray16.png")


def _write_split(split_dir: Path, classes=("a", "b")) -> None:
    for i, cls in enumerate(classes):
        (split_dir / cls).mkdir(parents=True, exist_ok=True)
        _rgb(10 + i).save(split_dir / cls / "ok.png")


@pytest.fixture()
def zoo_root(tmp_path) -> Path:
    _write_mode_zoo(tmp_path / "train" / "a")
    _write_split(tmp_path / "train", classes=("b",))
    _write_split(tmp_path / "val")
    return tmp_path


@pytest.fixture()
def corrupt_root(tmp_path) -> tuple[Path, list[str], int]:
    """train/ with 4 good and 3 bad files; returns (root, bad paths, good count)."""
    train = tmp_path / "train"
    _write_split(train)
    (train / "a" / "good.jpg").write_bytes(_jpeg_bytes(5))
    (train / "b" / "good2.png").write_bytes((train / "a" / "ok.png").read_bytes())
    bad = [train / "a" / "truncated.jpg", train / "b" / "empty.jpg", train / "b" / "text.png"]
    jpeg = _jpeg_bytes(6, size=64)
    bad[0].write_bytes(jpeg[: len(jpeg) // 2])  # header intact, pixel data cut
    bad[1].write_bytes(b"")
    bad[2].write_text("this is not an image")
    _write_split(tmp_path / "val")
    return tmp_path, sorted(str(p) for p in bad), 4


def test_every_colour_mode_loads_as_rgb(zoo_root):
    ds = RobustImageFolder(zoo_root / "train", transform=ToTensor())
    assert len(ds) == 7
    for i in range(len(ds)):
        image, _ = ds[i]
        assert image.shape == (3, SIZE, SIZE), ds.samples[i][0]


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(zoo_root):
    ds = RobustImageFolder(zoo_root / "train", transform=ToTensor())
    index = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("gray16.png"))
    image, _ = ds[index]
    # Clipping would make almost every pixel 1.0.
    assert 0.3 < image.mean().item() < 0.7


def test_strict_mode_names_the_corrupt_file(corrupt_root):
    root, bad, _ = corrupt_root
    # The truncated JPEG opens fine (PIL decodes lazily); only the full decode fails.
    Image.open(root / "train" / "a" / "truncated.jpg").close()
    ds = RobustImageFolder(root / "train", transform=ToTensor(), strict=True)
    failed = []
    for i, (path, _) in enumerate(ds.samples):
        if path in bad:
            with pytest.raises(CorruptImageError) as info:
                ds[i]
            assert path in str(info.value)
            assert info.value.path == path
            failed.append(path)
        else:
            ds[i]
    assert sorted(failed) == bad


def test_strict_error_from_worker_names_the_file(corrupt_root):
    root, bad, _ = corrupt_root
    ds = RobustImageFolder(root / "train", transform=ToTensor(), strict=True)
    loader = DataLoader(ds, batch_size=len(ds), num_workers=1, collate_fn=collate_skip_corrupt)
    with pytest.raises(CorruptImageError) as info:
        next(iter(loader))
    assert any(path in str(info.value) for path in bad)
    clone = pickle.loads(pickle.dumps(CorruptImageError(bad[0], "why")))
    assert (clone.path, clone.reason, str(clone)) == (bad[0], "why", f"corrupt or unreadable image file {bad[0]}: why")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_non_strict_loader_skips_and_reports(corrupt_root, num_workers):
    root, bad, good_count = corrupt_root
    ds = RobustImageFolder(root / "train", transform=ToTensor(), strict=False)
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=collate_skip_corrupt)
    images_seen, skipped = 0, []
    for images, targets, skipped_paths in loader:
        skipped += skipped_paths
        if images is not None:
            assert images.shape[1:] == (3, SIZE, SIZE)
            assert len(targets) == len(images)
            images_seen += len(images)
    assert images_seen == good_count
    assert sorted(skipped) == bad


def test_non_strict_returns_marker(corrupt_root):
    root, bad, _ = corrupt_root
    ds = RobustImageFolder(root / "train", strict=False)
    index = next(i for i, (p, _) in enumerate(ds.samples) if p == bad[0])
    assert ds[index] == CorruptSample(bad[0], ds[index].reason)


def test_all_corrupt_batch_gives_none_and_paths():
    images, targets, skipped = collate_skip_corrupt([CorruptSample("/x/1.jpg"), CorruptSample("/x/2.jpg")])
    assert images is None and targets is None
    assert skipped == ["/x/1.jpg", "/x/2.jpg"]


def test_clean_batch_has_empty_skip_list():
    batch = [(torch.zeros(3, 2, 2), 1), (torch.ones(3, 2, 2), 0)]
    images, targets, skipped = collate_skip_corrupt(batch)
    assert images.shape == (2, 3, 2, 2) and targets.tolist() == [1, 0] and skipped == []


def test_missing_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    for call in (lambda: validate_imagefolder_root(missing), lambda: RobustImageFolder(missing / "train")):
        with pytest.raises(FileNotFoundError) as info:
            call()
        message = str(info.value)
        assert str(missing) in message
        assert "DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg" in message


def test_missing_val_split_names_path(tmp_path):
    _write_split(tmp_path / "train")
    with pytest.raises(FileNotFoundError) as info:
        validate_imagefolder_root(tmp_path)
    assert str(tmp_path / "val") in str(info.value)
    assert "DIR/val/<class>" in str(info.value)


def test_empty_class_folder_and_no_classes(tmp_path):
    _write_split(tmp_path / "train")
    _write_split(tmp_path / "val")
    (tmp_path / "val" / "a" / "ok.png").unlink()
    with pytest.raises(FileNotFoundError, match="without images") as info:
        validate_imagefolder_root(tmp_path)
    assert str(tmp_path / "val" / "a") in str(info.value)

    (tmp_path / "empty_split").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        RobustImageFolder(tmp_path / "empty_split")


def test_class_mismatch_between_splits(tmp_path):
    _write_split(tmp_path / "train", classes=("a", "b", "c"))
    _write_split(tmp_path / "val", classes=("a", "c"))
    with pytest.raises(ValueError, match=r"only in train: \['b'\]"):
        validate_imagefolder_root(tmp_path)


def test_validation_does_not_decode_images(corrupt_root):
    root, _, _ = corrupt_root
    validate_imagefolder_root(root)  # corrupt files have image extensions: layout is fine
