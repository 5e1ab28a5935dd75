"""Building blocks that several operators share: a bank of n static kernels shaped like one convolution
(`kernel_bank.py`), a block's or stage's input summarised once for the layers inside it (`shared_input.py`),
annealed attention temperatures (`temperature.py`), a BatchNorm1d that trains on a batch of one
(`batch_safe_norm.py`) and a BatchNorm folded into a per-sample kernel (`batch_norm_affine.py`)."""
