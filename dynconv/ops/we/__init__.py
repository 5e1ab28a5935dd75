"""Weight Excitation (Quader et al., ECCV 2020): `op=lwe`, `op=mwe` and `op=we` (LWE on regular layers and MWE on
depthwise ones; `op.regular=lwe_mwe`: both on each regular layer, Table 3).

`operator.py` registers the three operators; `location.py` (LWE, Eq. 1) and `magnitude.py` (MWE, Eq. 2-3) are
the weight reparameterisations, `standardize.py` their input normalisation, `placement.py` which layers they take
and `parametrize.py` how they are put on a layer so that copies fold independently. The weight-normalising
reparameterisations WE is compared with (`dynconv/ops/reparam/`) share the last two.
"""

from dynconv.ops.we.location import LocationExcitation
from dynconv.ops.we.magnitude import MagnitudeExcitation
from dynconv.ops.we.operator import ONE_INPUT_REASON

__all__ = ["LocationExcitation", "MagnitudeExcitation", "ONE_INPUT_REASON"]
