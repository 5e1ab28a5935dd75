"""Where dynconv's config tree is: one source, whether dynconv runs from a clone or from an installed wheel.

In a clone (and an editable install of it) the configs are the repository's top-level `configs/`, the tree users
edit. A regular install (`pip install <path or git URL>`) has no clone: the build ships that same tree inside the
package as `dynconv/configs/` (setup.py maps it; nothing is copied by hand), and the entry points read it there.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The checkout's tree first: an editable install must read the files the user edits, not a stale copy.
_CANDIDATES = (PACKAGE_DIR.parent / "configs", PACKAGE_DIR / "configs")


def _find_config_dir() -> Path:
    for folder in _CANDIDATES:
        if (folder / "train.yaml").is_file():
            return folder
    raise FileNotFoundError(f"dynconv's configs are missing: looked for train.yaml in {', '.join(map(str, _CANDIDATES))} "
                            "(a broken install: reinstall with pip install <path or git URL of dynconv>)")


CONFIG_DIR = _find_config_dir()
# The clone dynconv runs from (None for a regular install): its train.py, git commit, results/.
CHECKOUT_DIR: Path | None = PACKAGE_DIR.parent if CONFIG_DIR == _CANDIDATES[0] else None
