"""Weight normalisation and spectral normalisation of a convolution weight through PyTorch's own
parametrizations (`torch.nn.utils.parametrizations`), put on a layer so that copies of the model fold
independently (`dynconv/ops/we/parametrize.py`).

- Weight normalisation, WN (Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to Accelerate
  Training of Deep Neural Networks", NeurIPS 2016, Eq. 2), per output channel j:

      w_j = g_j v_j / ||v_j||          v_j: the In x h x w weights of output channel j, g_j: a trainable scalar

  `weight_norm(conv, dim=0)`: the trainable tensors become `parametrizations.weight.original0` (g, Out x 1 x 1 x 1)
  and `original1` (v), and g starts at ||v||, so the layer computes what it did before. The paper's
  data-dependent initialisation of g and the bias (Sec. 3) is not done: the backbones follow their
  convolutions with BN (or GN), which sets the scale and shift of the output itself, and WE's Table 2 / 4 say
  nothing of it. Out extra parameters per layer, gone after folding.

- Spectral normalisation, SN (Miyato et al., "Spectral Normalization for Generative Adversarial Networks",
  ICLR 2018, Eq. 8 and Algorithm 1):

      W_SN = W / sigma(W),     sigma(W) ~ u^T W v,     W: the weight reshaped to Out x (In h w)

  with u (Out) and v (In h w) estimated by power iteration: `n_power_iterations` steps at every training forward
  (Miyato et al. use one, reusing u from the previous step), none in eval mode, where the stored u and v are used.
  `spectral_norm(conv, dim=0)`: u and v are buffers (`parametrizations.weight.0._u`, `_v`), so SN adds no
  parameters; it draws them at random and runs 15 power iterations when it is put on a layer. Torch's order
  inside an iteration is u = W v / ||W v||, then v = W^T u / ||W^T u|| (Algorithm 1 updates v first; the fixed
  point is the same). For a grouped convolution the reshaped matrix stacks the groups' blocks vertically, as
  Miyato's reshaping and torch do: its sigma bounds the block-diagonal operator's from above.
  Folding must use the eval-mode weight (no power iteration): `dynconv.profiling.fold_for_inference` puts the
  parametrizations in eval mode before it bakes them in.
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.utils import parametrizations

from dynconv.ops.we.parametrize import fold_independently


def normalize_weight(conv: nn.Module) -> nn.Module:
    """WN (Eq. 2) on the layer's weight, in place: one g per output channel (dim=0)."""
    return fold_independently(parametrizations.weight_norm(conv, "weight", dim=0))


def normalize_spectrum(conv: nn.Module, power_iterations: int) -> nn.Module:
    """SN (Eq. 8) on the layer's weight, in place: W / sigma(W) of the Out x (In h w) matrix, `power_iterations`
    power-iteration steps per training forward."""
    return fold_independently(parametrizations.spectral_norm(conv, "weight", n_power_iterations=power_iterations,
                                                             dim=0))
