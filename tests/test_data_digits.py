"""The embedded digits dataset: layout, split, idempotence and concurrent creation."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import stat
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dynconv.tasks.classification.digits import ensure_digits_imagefolder


@pytest.fixture(scope="module")
def digits_root(module_tmp) -> Path:
    return ensure_digits_imagefolder(module_tmp("digits") / "digits", image_size=32)


def _class_counts(split_dir: Path) -> Counter:
    return Counter({d.name: len(list(d.glob("*.png"))) for d in split_dir.iterdir() if d.is_dir()})


def test_split_sizes_and_classes(digits_root):
    train, val = _class_counts(digits_root / "train"), _class_counts(digits_root / "val")
    assert sum(train.values()) == 1437
    assert sum(val.values()) == 360
    assert sorted(train) == sorted(val) == [str(i) for i in range(10)]
    # Stratified: 20% of ~180 per class.
    assert all(abs(n - 36) <= 1 for n in val.values()), val
    marker = json.loads((digits_root / ".complete").read_text())
    assert marker["train"] == 1437 and marker["val"] == 360


def test_train_and_val_are_disjoint(digits_root):
    train = {p.name for p in (digits_root / "train").rglob("*.png")}
    val = {p.name for p in (digits_root / "val").rglob("*.png")}
    assert not train & val
    assert len(train | val) == 1797


def test_images_are_rgb_png_of_requested_size(digits_root):
    files = sorted((digits_root / "val" / "3").glob("*.png"))[:5]
    for path in files:
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.mode == "RGB"
            assert img.size == (32, 32)
            # Scaled to the full 8-bit range, not left at 0..16.
            assert max(img.getextrema()[0]) > 200


def test_tree_is_not_private(digits_root):
    # The temporary directory starts as 0700; the published tree must honour the umask.
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(digits_root.stat().st_mode) == 0o777 & ~umask


def test_second_call_does_not_rewrite(digits_root):
    probe = next((digits_root / "train" / "0").glob("*.png"))
    before = (probe.stat().st_mtime_ns, (digits_root / ".complete").stat().st_mtime_ns)
    assert ensure_digits_imagefolder(digits_root, image_size=32) == digits_root
    after = (probe.stat().st_mtime_ns, (digits_root / ".complete").stat().st_mtime_ns)
    assert before == after


def test_different_image_size_on_existing_tree_is_an_error(digits_root):
    with pytest.raises(ValueError, match="different settings"):
        ensure_digits_imagefolder(digits_root, image_size=16)


def test_non_empty_foreign_directory_is_not_overwritten(tmp_path):
    root = tmp_path / "taken"
    root.mkdir()
    (root / "something.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=str(root)):
        ensure_digits_imagefolder(root, image_size=8)
    assert (root / "something.txt").read_text() == "user data"
    # The losing temporary tree is cleaned up.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def _create(root: str, barrier, results) -> None:
    barrier.wait()  # maximise overlap so both really write
    results.put(str(ensure_digits_imagefolder(root, image_size=8)))


def test_concurrent_creation(tmp_path):
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    root = tmp_path / "shared" / "digits"
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(root), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in procs) == [str(root)] * 2
    # Exactly one complete tree, no leftover temporary directories.
    assert [p.name for p in root.parent.iterdir()] == ["digits"]
    assert sum(1 for _ in root.rglob("*.png")) == 1797
