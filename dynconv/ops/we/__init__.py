"""Weight Excitation (Quader et al., ECCV 2020): `op=lwe`, `op=mwe` and `op=we` (both on one layer).

`operator.py` registers the three operators; `location.py` (LWE, Eq. 1) and `magnitude.py` (MWE, Eq. 2-3) are
the weight reparameterisations, `standardize.py` their input normalisation and `parametrize.py` how they are put
on a layer so that copies fold independently.
"""

from dynconv.ops.we.location import LocationExcitation
from dynconv.ops.we.magnitude import MagnitudeExcitation
from dynconv.ops.we.operator import ONE_INPUT_REASON

__all__ = ["LocationExcitation", "MagnitudeExcitation", "ONE_INPUT_REASON"]
