"""Evaluate a checkpoint written by train.py: top-1/top-5 on the validation split, params and MACs. `python eval.py`
in a clone, `dynconv-eval` or `python -m dynconv.eval` in an install.

    python eval.py checkpoint=outputs/<run>/checkpoints/best.pt
    python eval.py checkpoint=outputs/<run> data.root=/imagenet   # a run folder (its best.pt); only val/ is read
    torchrun --standalone --nproc_per_node=8 eval.py checkpoint=... data.root=/imagenet

The model is rebuilt from the config stored in the checkpoint, so no model flags are needed.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from dynconv.config import ConfigError, register_resolvers
from dynconv.paths import CONFIG_DIR
from dynconv.engine.checkpoint import CorruptCheckpointError
from dynconv.engine.distributed import cleanup_distributed

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from dynconv.config import validate_eval_config
    from dynconv.engine.evaluation_run import evaluate_checkpoint
    from dynconv.overrides import reject_added_keys

    try:
        reject_added_keys(HydraConfig.get().overrides.task, "eval")  # a key nothing reads is a typo
        validate_eval_config(cfg)
        result = evaluate_checkpoint(cfg)
    except (ConfigError, CorruptCheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        cleanup_distributed()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
