"""The video data (docs/video.md): clip lists and labels, dense and segment sampling, the video_folder reader on frame
folders and real video files written with PyAV, bad clips skipped, counted and named (or stopping the run under
data.strict=true), one crop and flip per clip, the embedded toy clips, and the data keys' rules."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynconv.data.errors import DataError, ForeignFolderError, UnreadableImageError
from dynconv.tasks.video.clip_transforms import ClipTransform
from dynconv.tasks.video.list_file import read_class_names, read_clip_list, resolve_labels
from dynconv.tasks.video.loaders import build_video_data
from dynconv.tasks.video.sampling import ClipTooShort, dense_indices, segment_indices
from dynconv.tasks.video.toy_video import TOY_CLASSES, TOY_FRAMES, TOY_SIDE, ensure_toy_video

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores


# ------------------------------------------------------------------------------------------------- lists
def test_every_list_format_is_read(tmp_path):
    listing = tmp_path / "train.csv"
    listing.write_text("path,label\n"  # a CSV header
                       "# a comment\n\n"
                       "videos/a.mp4,Swiping Left\n"  # a class name with a space
                       "34870;Drumming Fingers\n"  # Jester's own lists
                       "clips/b\tpushing, then pulling\n"  # tab, and a comma inside the class name
                       "frames/c 42 7\n"  # TSM's '<path> <frames> <label>'
                       "frames/d 3\n")
    clips = read_clip_list(listing)
    assert [(clip.path, clip.label) for clip in clips] == [
        ("videos/a.mp4", "Swiping Left"), ("34870", "Drumming Fingers"), ("clips/b", "pushing, then pulling"),
        ("frames/c", "7"), ("frames/d", "3")]
    assert clips[0].where == f"{listing}:4"
    listing.write_text("a b c d\n")
    with pytest.raises(DataError, match=rf"{listing}:1: 'a b c d' is not a clip line"):
        read_clip_list(listing)
    with pytest.raises(FileNotFoundError, match="data.val_list=missing.csv: the clip list .* does not exist"):
        read_clip_list(tmp_path / "missing.csv", "data.val_list")


def test_labels_names_indices_and_a_classes_file(tmp_path):
    (tmp_path / "train.csv").write_text("a,run\nb,jump\nc,run\n")
    (tmp_path / "val.csv").write_text("d,jump\n")
    train, val = read_clip_list(tmp_path / "train.csv"), read_clip_list(tmp_path / "val.csv")
    assert resolve_labels(train, val, None) == ([1, 0, 1], [0], ["jump", "run"])  # sorted names of the train list
    (tmp_path / "classes.txt").write_text("run\njump\nswim\n")
    assert resolve_labels(train, val, read_class_names(tmp_path / "classes.txt")) == ([0, 1, 0], [1],
                                                                                     ["run", "jump", "swim"])
    (tmp_path / "val.csv").write_text("d,swim\n")
    with pytest.raises(DataError, match=r"val.csv:1: class 'swim' is not one of the 2 classes"):
        resolve_labels(train, read_clip_list(tmp_path / "val.csv"), None)
    (tmp_path / "val.csv").write_text("d,3\n")
    with pytest.raises(DataError, match="mixes class names and class indices"):
        resolve_labels(train, read_clip_list(tmp_path / "val.csv"), None)
    (tmp_path / "train.csv").write_text("a,0\nb,4\n")
    indexed = read_clip_list(tmp_path / "train.csv")
    assert resolve_labels(indexed, read_clip_list(tmp_path / "val.csv"), None)[2] == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------------------------------------- sampling
def test_dense_sampling_a_random_window_in_training_the_centre_in_evaluation():
    assert dense_indices(20, 4, 2, training=False) == [6, 8, 10, 12]  # span 7, centred in 20
    assert dense_indices(7, 4, 2, training=False) == [0, 2, 4, 6]  # exactly the span
    random.seed(0)
    starts = set()
    for _ in range(200):
        indices = dense_indices(20, 4, 2, training=True)
        assert np.diff(indices).tolist() == [2, 2, 2] and 0 <= indices[0] and indices[-1] <= 19
        starts.add(indices[0])
    assert starts == set(range(14))  # every start 0..13 is drawn
    with pytest.raises(ClipTooShort, match="has 6 frames, fewer than the 7"):
        dense_indices(6, 4, 2, training=False)


def test_segment_sampling_one_frame_per_segment():
    assert segment_indices(12, 4, training=False) == [1, 4, 7, 10]  # the middle of each 3-frame segment
    assert segment_indices(4, 4, training=False) == [0, 1, 2, 3]
    assert segment_indices(10, 4, training=False) == [1, 3, 6, 8]  # int((i + 1/2) x 2.5)
    random.seed(0)
    seen = [set() for _ in range(4)]
    for _ in range(200):
        for segment, index in enumerate(segment_indices(12, 4, training=True)):
            seen[segment].add(index)
    assert seen == [{0, 1, 2}, {3, 4, 5}, {6, 7, 8}, {9, 10, 11}]
    with pytest.raises(ClipTooShort, match="has 3 frames, fewer than the 4 segments"):
        segment_indices(3, 4, training=True)


# ------------------------------------------------------------------------------------ the video_folder reader
def _write_video(path: Path, levels: list[int], codec: str = "mpeg4", size: tuple[int, int] = (48, 36)) -> None:
    """A real video file (PyAV / FFmpeg): frame i is a flat grey of brightness levels[i]."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for level in levels:
            image = np.full((size[1], size[0], 3), level, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_frames(folder: Path, levels: list[int]) -> None:
    folder.mkdir(parents=True)
    for index, level in enumerate(levels, start=1):  # 1.png .. 10.png: natural order, not 1, 10, 2, ...
        Image.fromarray(np.full((36, 48, 3), level, dtype=np.uint8)).save(folder / f"{index}.png")


LEVELS = [10 * i for i in range(10)]  # frame i has brightness 10 i


@pytest.fixture
def clip_root(tmp_path):
    """Frame folders, an .mp4 and an .avi of 10 frames, plus a broken .mp4, a missing clip and a 2-frame clip."""
    _write_frames(tmp_path / "frames" / "wave", LEVELS)
    (tmp_path / "videos").mkdir()
    _write_video(tmp_path / "videos" / "clap.mp4", LEVELS)
    _write_video(tmp_path / "videos" / "clap.avi", LEVELS)
    _write_frames(tmp_path / "frames" / "short", LEVELS[:2])
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"this is not a video" * 20)
    (tmp_path / "train.csv").write_text("frames/wave,wave\nvideos/clap.mp4,clap\n")
    (tmp_path / "val.csv").write_text("frames/wave,wave\nvideos/clap.mp4,clap\nvideos/clap.avi,clap\n"
                                      "videos/broken.mp4,clap\nframes/gone,wave\nframes/short,wave\n")
    return tmp_path


def _data_cfg(root: Path, **overrides) -> dict:
    cfg = {"name": "video_folder", "root": str(root), "train_list": "train.csv", "val_list": "val.csv",
           "classes": None, "clips_dir": None, "num_classes": None, "num_frames": 4, "sampling": "dense",
           "frame_stride": 2, "resize": 24, "image_size": 16, "crop_scale": [0.75, 1.0], "hflip": 0.0,
           "strict": False, "num_workers": 0, "pin_memory": False, "persistent_workers": False,
           "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "max_train_samples": None, "max_val_samples": None}
    return {**cfg, **overrides}


RECIPE = {"batch_size": 2, "eval_batch_size": 8, "drop_last": True}


def test_frame_folders_and_video_files_give_the_sampled_frames(clip_root, caplog):
    """The centre dense window of 4 frames 2 apart in 10 frames is frames 1, 3, 5, 7: brightness 10, 30, 50, 70
    in every clip, whether frames (PNG, natural order) or decoded .mp4 / .avi; the three bad clips are skipped,
    counted and named with their reasons in one warning."""
    data = build_video_data(_data_cfg(clip_root), RECIPE)
    assert data.num_classes == 2 and data.class_names == ["clap", "wave"]
    with caplog.at_level(logging.WARNING, logger="dynconv"):
        (clips, targets, skipped), = list(data.val_loader)
    assert clips.shape == (3, 3, 4, 16, 16) and targets.tolist() == [1, 0, 0]
    brightness = clips.mean(dim=(1, 3, 4)) * 255  # per clip and frame
    torch.testing.assert_close(brightness, torch.tensor([[10.0, 30.0, 50.0, 70.0]] * 3), atol=3.0, rtol=0)
    reasons = {Path(path).name: path.reason for path in skipped}
    assert set(reasons) == {"broken.mp4", "gone", "short"}
    assert "FFmpeg cannot decode it" in reasons["broken.mp4"]
    assert reasons["gone"] == "no such video file or frame folder"
    assert "has 2 frames, fewer than the 7" in reasons["short"]
    assert "skipped 3 undecodable video clip(s)" in caplog.text
    assert str(clip_root / "videos" / "broken.mp4") in caplog.text
    assert data.val_loader.last_skipped == skipped


def test_strict_stops_naming_the_clip(clip_root):
    data = build_video_data(_data_cfg(clip_root, strict=True), RECIPE)
    with pytest.raises(UnreadableImageError) as info:
        list(data.val_loader)
    message = str(info.value)
    assert message.startswith(f"corrupt or unreadable video clip {clip_root / 'videos' / 'broken.mp4'}: FFmpeg")
    assert "data.strict=false to skip undecodable video clips" in message


def test_segments_and_training_clips(clip_root):
    """Segment sampling in evaluation: the middle frame of each of 4 segments of 2.5 frames (1, 3, 6, 8)."""
    data = build_video_data(_data_cfg(clip_root, sampling="segments"), RECIPE)
    clips, _, _ = next(iter(data.val_loader))
    torch.testing.assert_close(clips[0].mean(dim=(0, 2, 3)) * 255, torch.tensor([10.0, 30.0, 60.0, 80.0]), atol=3.0,
                               rtol=0)
    (train_clips, train_targets, skipped), = list(data.train_loader)  # 2 clips, batch 2
    assert train_clips.shape == (2, 3, 4, 16, 16) and sorted(train_targets.tolist()) == [0, 1] and not skipped


def test_one_crop_and_one_flip_per_clip():
    """Every frame of a clip gets the same crop and the same flip; evaluation takes the centre crop."""
    ramp = torch.arange(20, dtype=torch.uint8).repeat(20, 1)  # brightness grows left to right
    frames = torch.stack([ramp * (t + 1) for t in range(3)])[..., None].expand(3, 20, 20, 3).contiguous()
    common = dict(image_size=10, mean=[0.0] * 3, std=[1.0] * 3)
    random.seed(3)
    flipped = ClipTransform(training=True, crop_scale=(0.5, 0.5), hflip=1.0, **common)(frames)
    for t in range(3):  # the same window in every frame (frame t is (t + 1) x frame 0), mirrored
        torch.testing.assert_close(flipped[:, t], flipped[:, 0] * (t + 1), atol=1e-5, rtol=0)
    assert (flipped[0, 0, 0, :-1] >= flipped[0, 0, 0, 1:]).all()  # decreasing: flipped
    centre = ClipTransform(training=False, crop_scale=(1.0, 1.0), hflip=1.0, **common)(frames)
    assert centre.shape == (3, 3, 10, 10)
    torch.testing.assert_close(centre[0, 0, 0] * 255, torch.arange(5, 15, dtype=torch.float32))  # columns 5..14


# ----------------------------------------------------------------------------------------- the embedded toy
def test_toy_video_is_written_once_in_the_video_folder_layout(data_dir):
    root = ensure_toy_video(data_dir / "toy_video")
    assert (root / "classes.txt").read_text().split() == list(TOY_CLASSES)
    lines = (root / "train.csv").read_text().splitlines()
    assert len(lines) == 320 and lines[0] == "frames/train/00001,left"
    assert len((root / "val.csv").read_text().splitlines()) == 80
    frames = sorted((root / "frames" / "val" / "00002").iterdir())
    assert len(frames) == TOY_FRAMES and Image.open(frames[0]).size == (TOY_SIDE, TOY_SIDE)
    stamp = (root / ".complete").stat().st_mtime_ns
    assert ensure_toy_video(root) == root and (root / ".complete").stat().st_mtime_ns == stamp  # not rewritten


def test_toy_video_refuses_a_folder_of_something_else(tmp_path):
    (tmp_path / "train.csv").write_text("a,b\n")
    (tmp_path / "val.csv").write_text("a,b\n")
    with pytest.raises(ForeignFolderError, match=f"data=video_folder data.root={tmp_path}"):
        ensure_toy_video(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train.csv", "val.csv"]


# ------------------------------------------------------------------------------------------- the data keys
@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("data.sampling", "sparse", "allowed values: dense, segments"),
    ("data.num_frames", 0, "allowed values: integers in [1, 512]"),
    ("data.frame_stride", 0, "allowed values: integers >= 1"),
    ("data.resize", 16, "allowed values: integers in [32, 8192]"),  # below data.image_size=32
    ("data.crop_scale", [0.9, 0.1], "allowed values: a pair [a, b] with 0 < a <= b <= 1"),
    ("data.val_list", "", "allowed values: a non-empty string"),
    ("data.num_classes", 5, "allowed values: null, 4 (data=toy_video has 4 classes)"),
])
def test_a_wrong_data_value_is_refused_naming_the_key(compose_cfg, key, value, allowed):
    from dynconv.config import ConfigError, validate_data_config

    override = f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
    cfg = compose_cfg(["task=video", "data=toy_video", override.replace(" ", "")])
    with pytest.raises(ConfigError) as info:
        validate_data_config(cfg)
    assert f"{key}=" in str(info.value) and allowed in str(info.value)


def test_the_video_folder_layout_is_checked_before_a_run(compose_cfg, tmp_path):
    from dynconv.config import ConfigError, validate_data_config

    (tmp_path / "train.csv").write_text("a,x\n")
    cfg = compose_cfg(["task=video", "data=video_folder", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.val_list=val.csv: the clip list .*val.csv does not exist"):
        validate_data_config(cfg)
    with pytest.raises(ConfigError, match="data=video_folder does not fit task=classification"):
        validate_data_config(compose_cfg(["data=video_folder", f"data.root={tmp_path}"]))
