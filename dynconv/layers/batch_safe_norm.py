"""BatchNorm1d for attention branches that must also train on a batch of one.

The reference implementations of ODConv and KernelWarehouse put a BatchNorm1d inside their attention, which
raises at batch size 1 in train mode (ODConv#27: one value per channel has no batch variance). Normalising that
one sample with the running statistics instead (the eval-mode computation, without updating them) is the only
well-defined normalisation for one sample: it keeps the attention input-dependent (batch statistics of one
sample would map every sample to beta, i.e. a constant attention), and batches > 1 train exactly as the
reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchSafeBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that, in train mode, normalises a batch of one sample with its running statistics.

    Batches of two or more are normalised (and update the running statistics) exactly as nn.BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1 and self.track_running_stats:
            # Batch statistics of one sample are degenerate (nn.BatchNorm1d raises); use the running ones
            # and leave them untouched (a single sample would bias them).
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)
