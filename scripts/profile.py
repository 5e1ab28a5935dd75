"""Parameters and MACs of a backbone x operator x attention (x task), as the papers count them.

    python scripts/profile.py backbone=resnet18 op=condconv op.experts=8
    python scripts/profile.py task=retinanet backbone=shufflenetv2_wn_x0_5 op=weightnet op.lam=4 op.G=1

Prints a readable summary, then, as the last stdout line, one JSON object. Classification:
{"params": int, "params_inference": int, "macs": int, "macs_inference": int, "input_size": [3, H, W], ...}
(`*_inference`: after `fold_for_inference`, e.g. Weight Excitation folded into plain convolutions). Detection:
the detector's and its backbone's counts (`dynconv/tasks/detection/profile.py`). The task decides
(`Task.profile`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)


def config(argv: list[str]):
    """The composed, validated config of these command-line arguments (exit 2 on a bad one); nothing runs.
    tests/test_docs_commands.py composes every documented command of this script through it."""
    return compose_or_exit("profile", argv, validate="model")


def main(argv: list[str]) -> int:
    cfg = config(argv)
    from dynconv.tasks import TASKS

    text, record = TASKS.get(cfg.task.name).profile(cfg)
    print(text)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
