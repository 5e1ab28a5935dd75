"""Train/eval image transforms built by timm from the data and augmentation configs.

Why timm: its ``create_transform`` already implements the ImageNet recipe
pieces we need (RandomResizedCrop, RandAugment, RandomErasing, crop_pct eval
resize) and is what published timm results were trained with.
This module only translates our config keys into its arguments.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from dynconv.tasks.classification.timm_compat import patch_posterize_ops

__all__ = ["build_transforms"]

_OFF = {"", "none", "null", "off", "false"}


def _tuple(value: Any) -> tuple[float, ...] | None:
    # OmegaConf gives ListConfig; timm wants real tuples of floats.
    return None if value is None else tuple(float(v) for v in value)


def _auto_augment(value: Any) -> str | None:
    if value is None or str(value).strip().lower() in _OFF:
        return None
    return str(value)


def _color_jitter(value: Any) -> float | tuple[float, ...] | None:
    # 0 / None disable the transform outright instead of running a no-op ColorJitter.
    if value is None or value is False:
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    values = _tuple(value)
    return values if values and any(v > 0 for v in values) else None


def build_transforms(
    data_cfg: Mapping[str, Any],
    aug_cfg: Mapping[str, Any] | None,
    is_training: bool,
) -> Callable:
    """Return a PIL-image -> normalised tensor transform.

    data_cfg keys: image_size, mean, std, crop_pct (eval), interpolation.
    aug_cfg keys (training only): scale, ratio, hflip, vflip, color_jitter,
    auto_augment (e.g. ``'rand-m9-mstd0.5-inc1'`` or None), re_prob, re_mode, re_count.
    """
    aug_cfg = aug_cfg if aug_cfg is not None else {}
    size = int(data_cfg.get("image_size", 224))
    kwargs: dict[str, Any] = dict(
        input_size=(3, size, size),
        is_training=bool(is_training),
        interpolation=str(data_cfg.get("interpolation", "bilinear") or "bilinear"),
        mean=_tuple(data_cfg.get("mean")) or IMAGENET_DEFAULT_MEAN,
        std=_tuple(data_cfg.get("std")) or IMAGENET_DEFAULT_STD,
    )
    if is_training:
        kwargs.update(
            scale=_tuple(aug_cfg.get("scale", (0.08, 1.0))),
            ratio=_tuple(aug_cfg.get("ratio", (3.0 / 4.0, 4.0 / 3.0))),
            hflip=float(aug_cfg.get("hflip", 0.5) or 0.0),
            vflip=float(aug_cfg.get("vflip", 0.0) or 0.0),
            color_jitter=_color_jitter(aug_cfg.get("color_jitter", 0.4)),
            auto_augment=_auto_augment(aug_cfg.get("auto_augment")),
            re_prob=float(aug_cfg.get("re_prob", 0.0) or 0.0),
            re_mode=str(aug_cfg.get("re_mode", "pixel") or "pixel"),
            re_count=int(aug_cfg.get("re_count", 1) or 1),
        )
    else:
        crop_pct = data_cfg.get("crop_pct")
        kwargs["crop_pct"] = None if crop_pct is None else float(crop_pct)
    return patch_posterize_ops(create_transform(**kwargs))
