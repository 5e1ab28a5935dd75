"""Telling a JSON annotation file from something else, cheaply and with a message a user can act on.

Why: a failed download saves an HTML error page, an archive or nothing under the expected name, and json's
own errors ("Expecting value: line 1 column 1 (char 0)") name neither the file nor what it holds. Config
validation reads only the first bytes (`check_json_object_start`), so that case stops before anything is
written; the full parse happens when the dataset is built, and `describe_json_error` words what went wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["check_json_object_start", "describe_json_error"]

_SNIFF_BYTES = 256


def check_json_object_start(path: str | os.PathLike) -> None:
    """ValueError naming `path` unless its first non-blank character is "{" (a JSON object)."""
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if not text:
        raise ValueError(f"{Path(path)} is empty{' (only blanks)' if head else ''}, not a JSON object")
    if not text.startswith(b"{"):
        shown = text[:40].decode("utf-8", errors="replace")
        raise ValueError(f"{Path(path)} is not a JSON object: it starts with {shown!r}")


def describe_json_error(error: BaseException) -> str:
    """What a json/pycocotools failure on an annotation file means, in words."""
    if isinstance(error, json.JSONDecodeError):
        return f"it is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
    if isinstance(error, UnicodeDecodeError):
        return "it is not text (a binary file)"
    if isinstance(error, AssertionError):
        return "its top level is not a JSON object"
    if isinstance(error, KeyError):
        return f"an entry has no {error} key"
    return f"{type(error).__name__}: {error}"
