"""The training engine: the loop (`trainer.py`) and its hooks (`hooks/`), one run from a validated config to
its metrics (`training_run.py`, what train.py calls) and a checkpoint's evaluation (`evaluation_run.py`, what
eval.py calls), atomic checkpoints (`checkpoint.py`) and the process group (`distributed.py`)."""
