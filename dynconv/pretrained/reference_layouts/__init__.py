"""The key layouts of the operators' public releases, for importing their checkpoints (`scripts/import_checkpoint.py`).

One module per release (`kernelwarehouse.py`, `odconv.py`), each saying, from the release's code, where every key of
its checkpoints goes in dynconv's model and checking what the keys cannot show (KernelWarehouse's cell allocation,
the knobs that change the function without changing a key); `key_mapping.py` insists that the mapping is one to
one; the static layers' names are `dynconv/pretrained/module_names.py`'s.
"""

from dynconv.pretrained.reference_layouts.kernelwarehouse import KernelWarehouseRelease
from dynconv.pretrained.reference_layouts.key_mapping import LayoutMismatch, MappedState
from dynconv.pretrained.reference_layouts.odconv import ODConvRelease

RELEASES = {"kernelwarehouse": KernelWarehouseRelease(), "odconv": ODConvRelease()}

__all__ = ["RELEASES", "LayoutMismatch", "MappedState"]
