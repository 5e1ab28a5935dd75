"""The channel rounding of the Dy-* networks (DyNet, Zhang et al. 2020, Sec. 3.3).

Dy-mobile sets groups = C_out/6 in its depthwise layer and "will enlarge C_out to make it become the multiple
of 6 if needed"; Dy-shuffle splits 3:1 and groups its right branch's depthwise layer, so a stage width must
split into quarters whose size the group size divides. Widths are rounded up, never down, as the paper does.
A width or group size that cannot be rounded (not a positive integer) is refused here, at build time, with
the key, the value and what is allowed.
"""

from __future__ import annotations

import math

from dynconv.knobs import is_int


def _require_positive_int(key: str, value, network: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{network}: {key}={value!r} cannot be rounded to DyNet's channel multiples: allowed values "
                         "are integers >= 1")
    return value


def round_up(channels, multiple, *, key: str, network: str) -> int:
    """The smallest multiple of `multiple` that is >= `channels` (both positive integers, else ValueError)."""
    channels = _require_positive_int(key, channels, network)
    multiple = _require_positive_int("group_size", multiple, network)
    return math.ceil(channels / multiple) * multiple


def dy_mobile_widths(widths, group_size: int) -> list[int]:
    """MobileNetV2's block widths enlarged to multiples of the depthwise group size (6 in the paper)."""
    return [round_up(width, group_size, key=f"block width #{index}", network="dynet_mobile")
            for index, width in enumerate(widths)]


def dy_shuffle_widths(widths, group_size: int, quarters: int = 4) -> list[int]:
    """ShuffleNetV2 stage widths enlarged so that the right branch (a quarter, 3:1 split) divides into groups of
    `group_size` channels: multiples of 4 * group_size (116 -> 120 for 1.0x at group size 2)."""
    group_size = _require_positive_int("group_size", group_size, "dynet_shuffle")
    return [round_up(width, quarters * group_size, key=f"stage width #{index}", network="dynet_shuffle")
            for index, width in enumerate(widths)]
