"""Make timm's auto-augment posterize ops work with Pillow >= 12.

Why: timm's RandAugment/AutoAugment can ask for posterize with 0 bits kept
(e.g. ``PosterizeIncreasing`` at magnitude 10, which ``rand-m9-mstd0.5-inc1``
reaches whenever the sampled magnitude is clipped at the maximum).  Old Pillow
returned an all-black image for that; current Pillow raises ``ValueError``,
which would crash a training run at a random step.  We restore the old result.

The fix is applied to the ops of a built transform only, not by patching
timm's global op table, so other users of timm in the process are unaffected.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageOps

__all__ = ["safe_posterize", "patch_posterize_ops"]


def safe_posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Posterize accepting 0..8 bits; 0 bits gives the black image old Pillow produced."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)  # every bit masked away -> all zeros
    return ImageOps.posterize(img, bits)


def _augment_ops(transform: Any):
    """Yield timm AugmentOp objects found anywhere inside a (nested) transform."""
    stack = [transform]
    while stack:
        node = stack.pop()
        if isinstance(node, (list, tuple)):  # AutoAugment policy: list of sub-policy lists
            stack.extend(node)
            continue
        if hasattr(node, "aug_fn") and hasattr(node, "name"):
            yield node
            continue
        for attr in ("transforms", "ops", "policy"):
            children = getattr(node, attr, None)
            if isinstance(children, (list, tuple)):
                stack.append(children)


def patch_posterize_ops(transform: Any) -> Any:
    """Replace the posterize function of every timm AugmentOp in ``transform``; returns it."""
    for op in _augment_ops(transform):
        if str(op.name).startswith("Posterize"):
            # Module-level function keeps the transform picklable for spawn workers.
            op.aug_fn = safe_posterize
    return transform
