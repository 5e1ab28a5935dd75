"""build_transforms: config translation to timm, and the Pillow posterize compatibility fix."""

from __future__ import annotations

import random

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from dynconv.tasks.classification.transforms import build_transforms
from dynconv.tasks.classification.timm_compat import safe_posterize


def _image(size: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_train_and_eval_shapes_with_omegaconf():
    data_cfg = OmegaConf.create({"image_size": 24, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875,
                                 "interpolation": "bicubic"})
    aug_cfg = OmegaConf.create({"scale": [0.08, 1.0], "ratio": [0.75, 1.33], "hflip": 0.5, "vflip": 0.0,
                                "color_jitter": 0.4, "auto_augment": None, "re_prob": 0.25,
                                "re_mode": "pixel", "re_count": 1})
    train = build_transforms(data_cfg, aug_cfg, is_training=True)
    evaluation = build_transforms(data_cfg, aug_cfg, is_training=False)
    assert train(_image()).shape == (3, 24, 24)
    out = evaluation(_image())
    assert out.shape == (3, 24, 24)
    assert torch.equal(out, evaluation(_image()))  # eval is deterministic
    assert "RandomErasing" in repr(train) and "ColorJitter" in repr(train)


def test_disabled_augmentations_are_left_out():
    aug_cfg = {"color_jitter": 0.0, "auto_augment": "none", "re_prob": 0.0}
    text = repr(build_transforms({"image_size": 16}, aug_cfg, is_training=True))
    assert "ColorJitter" not in text and "RandAugment" not in text and "RandomErasing" not in text


def test_posterize_with_zero_bits_does_not_crash():
    assert np.asarray(safe_posterize(_image(8), 0)).max() == 0
    assert safe_posterize(_image(8), 8) is not None
    # Magnitude 10 without noise makes PosterizeIncreasing keep 0 bits, which
    # Pillow >= 12 rejects; 2 of 15 ops per call, so 200 calls hit it for sure.
    transform = build_transforms({"image_size": 16}, {"auto_augment": "rand-m10-mstd0-inc1"}, is_training=True)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for _ in range(200):
        transform(_image(16))
