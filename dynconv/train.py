"""Train a backbone x operator x task from Hydra configs: `python train.py` in a clone, `dynconv-train` or
`python -m dynconv.train` from any folder in an install (the configs ship inside the package: dynconv/paths.py).

    python train.py                                  # quickstart on the embedded digits
    python train.py backbone=resnet50 op=condconv op.experts=4 data=imagenet data.root=/imagenet
    torchrun --standalone --nproc_per_node=8 train.py experiment=resnet18_condconv_imagenet
    python train.py -m op.experts=4,8                # a sweep

The last stdout line is one JSON object with the final metrics (`"status"`: completed, stopped or failed).
Rerunning the same command resumes the run (its folder is named by a hash of the config); the exit codes are
listed in dynconv/engine/failures.py and docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dynconv.config import ConfigError, register_resolvers
from dynconv.paths import CONFIG_DIR
from dynconv.engine.checkpoint import CorruptCheckpointError
from dynconv.engine.distributed import cleanup_distributed
from dynconv.engine.failures import RunFailure
from dynconv.engine.run_naming import register_run_folder_resolver
from dynconv.engine.shutdown import install_exit_reaper

register_resolvers()
register_run_folder_resolver()
install_exit_reaper()  # no exit path may wait forever on DataLoader workers
log = logging.getLogger("dynconv")

# Read before Hydra runs: whether the output root existed decides whether a rejected run may remove it.
OUTPUT_ROOT = Path(os.environ.get("DYNCONV_OUTPUT_DIR", "outputs")).resolve()
OUTPUT_ROOT_EXISTED = OUTPUT_ROOT.exists()


def _remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the run directory (and <date>/ above it) before our checks run; a rejected config must
    leave nothing. Removes the run folder if empty, then its empty parents up to the output root, and the
    root itself only if this launch created it. Folders outside the output root other than the run folder
    itself are never touched (they may be the user's)."""
    run_dir = run_dir.resolve()
    for folder in (run_dir, *run_dir.parents):
        inside_root = folder == OUTPUT_ROOT or OUTPUT_ROOT in folder.parents
        if folder != run_dir and not inside_root:
            return
        if folder == OUTPUT_ROOT and OUTPUT_ROOT_EXISTED:
            return
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            return
        if folder == OUTPUT_ROOT:
            return


def _fail(run_dir: Path, error: BaseException, exit_code: int) -> None:
    """The end of a run that failed: the reason on stderr, a final JSON line, a non-zero exit."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    print(json.dumps({"status": "failed", "error": str(error), "exit_code": exit_code,
                      "run_dir": str(run_dir.resolve())}), flush=True)
    sys.exit(exit_code)


def _keep_large_buffers() -> None:
    """glibc keeps freed large buffers for the next step instead of unmapping them (dynconv/allocator.py:
    DYNCONV_MALLOC=retain|default); an invalid value stops the run as a bad config."""
    from dynconv import allocator

    try:
        allocator.apply()
    except ValueError as error:
        raise ConfigError(str(error)) from None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    from dynconv.engine.training_run import run_training

    from dynconv.overrides import reject_added_keys

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        reject_added_keys(HydraConfig.get().overrides.task, "train")  # `+recipe.epoch=1`: a key nothing reads
        _keep_large_buffers()
        result, exit_code = run_training(cfg, run_dir)
    except (ConfigError, CorruptCheckpointError) as error:
        _remove_if_empty(run_dir)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except RunFailure as error:
        _fail(run_dir, error, error.exit_code)
    except KeyboardInterrupt:
        # Outside the training loop (building, writing the dataset) or a second Ctrl-C: nothing new to save.
        _remove_if_empty(run_dir)
        _fail(run_dir, KeyboardInterrupt("interrupted (Ctrl-C); the last saved checkpoint, if any, is kept: rerun "
                                         "the same command to resume"), 130)
    except Exception as error:  # a bug, a lost rank, out of memory: the traceback matters here
        log.exception("training failed")
        _fail(run_dir, RuntimeError(f"{type(error).__name__}: {error}"), 1)
    cleanup_distributed()  # only after success: tearing down a broken process group can block
    print(json.dumps(result), flush=True)
    if exit_code:
        sys.exit(exit_code)


if __name__ == "__main__":
    main()
