"""Evaluate a checkpoint written by train.py (the code: dynconv/eval.py).

    python eval.py checkpoint=outputs/<run>/checkpoints/best.pt
    python eval.py checkpoint=outputs/<run> data.root=/imagenet     # a run folder: its best checkpoint
    torchrun --standalone --nproc_per_node=8 eval.py checkpoint=... data.root=/imagenet

The same entry point is `dynconv-eval` and `python -m dynconv.eval` in an install that is not a clone.
"""

from dynconv.eval import main

if __name__ == "__main__":
    main()
