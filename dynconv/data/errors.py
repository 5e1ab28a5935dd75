"""The errors a dataset on disk can cause: each is a ConfigError, so train.py and eval.py print one `error:` line
and exit 2 instead of a traceback.

Why ConfigError: a data problem is the same kind of failure as a bad key for the user (the run cannot go on as
configured, and the fix is in the files or the config), and the launchers already turn ConfigError into a clean
exit. Every message names the path at fault and what to do about it; none suggests deleting a user's folder.

Two of them are also the OSError the code raised before (FileNotFoundError, FileExistsError), so callers and
tests that catch those keep working.
"""

from __future__ import annotations

from dynconv.config import ConfigError

__all__ = ["DataError", "ForeignFolderError", "MissingFilesError", "UnreadableImageError"]


class DataError(ConfigError):
    """The files under data.root cannot be used as configured (layout, metadata or content)."""


class MissingFilesError(DataError, FileNotFoundError):
    """Files the dataset lists (an image named in an annotation file) are not on disk."""


class ForeignFolderError(DataError, FileExistsError):
    """data.root of an embedded dataset holds something else; nothing was written there."""


class UnreadableImageError(DataError):
    """With data.strict=true: an image file could not be decoded (named, with the decoder's reason)."""
