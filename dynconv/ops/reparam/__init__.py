"""Weight-normalising reparameterisations of convolution weights, the baselines of Weight Excitation's Table 2 and
Table 4: `op=weight_std` (Qiao et al.), `op=weight_norm` (Salimans & Kingma 2016), `op=spectral_norm` (Miyato et
al. 2018).

`operator.py` registers the three operators; `standardization.py` is WS's parametrization and `torch_norms.py`
puts PyTorch's weight- and spectral-norm parametrizations on a layer. They share Weight Excitation's placement and
folding (`dynconv/ops/we/placement.py`, `parametrize.py`).
"""

from dynconv.ops.reparam.operator import (SpectralNormOperator, WeightNormOperator, WeightStandardizationOperator)
from dynconv.ops.reparam.standardization import WeightStandardization

__all__ = ["SpectralNormOperator", "WeightNormOperator", "WeightStandardization", "WeightStandardizationOperator"]
