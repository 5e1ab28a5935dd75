"""Train a backbone x operator x task from Hydra configs (the code: dynconv/train.py).

    python train.py                                  # quickstart on the embedded digits
    python train.py backbone=resnet50 op=condconv op.experts=4 data=imagenet data.root=/imagenet
    torchrun --standalone --nproc_per_node=8 train.py experiment=resnet18_condconv_imagenet
    python train.py -m op.experts=4,8                # a sweep

The same entry point is `dynconv-train` and `python -m dynconv.train` in an install that is not a clone.
"""

from dynconv.train import main

if __name__ == "__main__":
    main()
