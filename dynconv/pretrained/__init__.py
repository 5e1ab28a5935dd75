"""Pretrained weights in: a static network's weights into a dynamic model (`init_from_static`, train.py's
`init_from_static=`), and the operators' reference releases' checkpoints into dynconv checkpoints
(`import_release`, scripts/import_checkpoint.py). docs/pretrained.md."""

from dynconv.pretrained.import_release import import_release
from dynconv.pretrained.init_from_static import StaticInitReport, init_from_static

__all__ = ["StaticInitReport", "import_release", "init_from_static"]
