"""Reading knobs from a config section: the one validator every operator, attention add-on, task, benchmark and
config check uses.

`Knobs(cfg, "op", owner="op=condconv", error=OperatorConfigError).integer("experts")` returns the value or
raises `error` with one message shape, naming the key, the value and what is allowed:

    op.experts=0 is invalid for op=condconv: allowed values are integers >= 1
    recipe.epochs=0 is invalid; allowed values: integers >= 1                    (no owner: a top-level key)

Every check is done before anything is built or written (config validation builds the model on the meta
device), so a typo in a sweep fails in a second, not after a job queued for a day. Booleans are never numbers
here (`True` is an int in Python, but `op.experts=true` is a mistake).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Knobs:
    """The knobs of one config section (`cfg`, a mapping), read and validated one key at a time."""

    def __init__(self, cfg: Mapping[str, Any], section: str = "", owner: str | None = None,
                 error: type[Exception] = ValueError):
        self.cfg = cfg
        self.section = section  # "op", "attn", "task", "bench", ... ("" for top-level keys)
        self.owner = owner  # "op=condconv": named in the message
        self.error = error

    def name(self, key: str) -> str:
        return f"{self.section}.{key}" if self.section else key

    def fail(self, key: str, value: Any, allowed: str) -> Exception:
        """The error for `key`=`value`, saying what is allowed (raise it)."""
        if self.owner:
            return self.error(f"{self.name(key)}={value!r} is invalid for {self.owner}: allowed values are {allowed}")
        return self.error(f"{self.name(key)}={value!r} is invalid; allowed values: {allowed}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.cfg.get(key, default)

    def integer(self, key: str, low: int = 1, *, high: int | None = None, odd: bool = False,
                nullable: bool = False) -> int | None:
        """An integer >= `low` (<= `high` when given; odd, if asked: a kernel size that keeps the map's size);
        null where allowed."""
        value = self.cfg.get(key)
        if value is None and nullable:
            return None
        if not is_int(value) or value < low or (high is not None and value > high) or (odd and value % 2 == 0):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            allowed = f"{'odd ' if odd else ''}integers {bounds}" + (" or null" if nullable else "")
            raise self.fail(key, value, allowed)
        return value

    def number(self, key: str, low: float | None = None, *, inclusive: bool = False, note: str = "",
               nullable: bool = False) -> float | None:
        """A finite number, > `low` (>= with `inclusive`) when given; null where allowed."""
        value = self.cfg.get(key)
        if value is None and nullable:
            return None
        if not is_number(value) or (low is not None and (value < low if inclusive else value <= low)):
            allowed = "finite numbers" + ("" if low is None else f" {'>=' if inclusive else '>'} {low:g}")
            allowed = ("null or " if nullable else "") + allowed
            raise self.fail(key, value, allowed + (f" ({note})" if note else ""))
        return float(value)

    def number_in(self, key: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                  nullable: bool = False) -> float | None:
        """A finite number in [low, high] (either end open with `low_open` / `high_open`); null where allowed."""
        value = self.cfg.get(key)
        if value is None and nullable:
            return None
        if (not is_number(value) or not (low < value if low_open else low <= value)
                or not (value < high if high_open else value <= high)):
            allowed = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise self.fail(key, value, ("null or " if nullable else "") + allowed)
        return float(value)

    def number_list(self, key: str, length: int | None = None) -> list[float]:
        """A non-empty list of positive numbers (of `length` items when given)."""
        value = self.cfg.get(key)
        allowed = f"a list of {length} positive numbers" if length else "a non-empty list of positive numbers"
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self.fail(key, value, allowed)
        items = list(value)
        if not items or (length and len(items) != length) or not all(is_number(v) and v > 0 for v in items):
            raise self.fail(key, items, allowed)
        return [float(v) for v in items]

    def choice(self, key: str, allowed: Sequence[Any], default: Any = None) -> Any:
        """One of `allowed`, of the same type too: `true` is not the 1 of `checkpoint.keep_last: 1 | 2`, nor 1.0."""
        value = self.cfg.get(key, default)
        if not any(value == option and type(value) is type(option) for option in allowed):
            raise self.fail(key, value, ", ".join(map(str, allowed)))
        return value

    def integer_or(self, key: str, words: Sequence[str], low: int = 0) -> int | str:
        """One of the `words` (`auto`) or an integer >= `low`."""
        value = self.cfg.get(key)
        if isinstance(value, str) and value in words:
            return value
        if not is_int(value) or value < low:
            raise self.fail(key, value, f"{', '.join(words)}, integers >= {low}")
        return value

    def text(self, key: str) -> str:
        """A non-empty string (a split name, a folder name)."""
        value = self.cfg.get(key)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, value, "a non-empty string")
        return value

    def strings(self, key: str, *, example: str = "", nullable: bool = False) -> list[str] | None:
        """A list of non-empty strings (patterns, names), possibly empty; a bare string is not one (it would be
        read character by character); null where allowed."""
        value = self.cfg.get(key)
        if value is None and nullable:
            return None
        allowed = ("null or " if nullable else "") + "a list of non-empty strings" + (f", e.g. {example}" if example else "")
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self.fail(key, value, allowed)
        if not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, list(value), allowed)
        return list(value)

    def numbers(self, key: str, *, length: int | None = None, low: float | None = None, inclusive: bool = True,
                high: float | None = None, integers: bool = False, ascending: bool = False,
                empty: bool = False) -> list[float]:
        """A list of finite numbers (integers with `integers`): `length` items when given (else at least one,
        or none with `empty`), each >= `low` (> with inclusive=False) and <= `high` when given, strictly
        ascending with `ascending`."""
        value = self.cfg.get(key)
        kind = "integers" if integers else "numbers"
        bounds = [f"{'>=' if inclusive else '>'} {low:g}"] if low is not None else []
        bounds += [f"<= {high:g}"] if high is not None else []
        allowed = (f"a list of {length} {kind}" if length else f"a {'' if empty else 'non-empty '}list of {kind}")
        allowed += (f" {' and '.join(bounds)}" if bounds else "") + (" in ascending order" if ascending else "")
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self.fail(key, value, allowed)
        items = list(value)
        fits = (is_int if integers else is_number)
        if ((length and len(items) != length) or (not items and not empty)
                or not all(fits(v) and is_number(v) for v in items)
                or (low is not None and not all(v >= low if inclusive else v > low for v in items))
                or (high is not None and not all(v <= high for v in items))
                or (ascending and any(b <= a for a, b in zip(items, items[1:])))):
            raise self.fail(key, items, allowed)
        return [int(v) if integers else float(v) for v in items]

    def pair(self, key: str, low: float, high: float | None = None) -> tuple[float, float]:
        """A range [a, b] with low < a <= b (<= high when given): a crop's area or aspect-ratio range."""
        value = self.cfg.get(key)
        allowed = f"a pair [a, b] with {low:g} < a <= b" + (f" <= {high:g}" if high is not None else "")
        items = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else None
        if (items is None or len(items) != 2 or not all(is_number(v) for v in items) or not low < items[0] <= items[1]
                or (high is not None and items[1] > high)):
            raise self.fail(key, value if items is None else items, allowed)
        return float(items[0]), float(items[1])

    def flag(self, key: str) -> bool:
        value = self.cfg.get(key)
        if not isinstance(value, bool):
            raise self.fail(key, value, "true, false")
        return value

    def reject_unknown(self, known: Sequence[str]) -> None:
        """A typo (`attn.reducton`) would otherwise be ignored silently when the section is a plain dict."""
        unknown = sorted(set(self.cfg) - {"name", *known})
        if unknown:
            raise self.error(f"{self.name(unknown[0])} is not a knob of {self.owner}; its knobs are: "
                             f"{', '.join(known) or '(none)'}")
