"""Data parts every task shares: the DATASETS registry (`datasets.py`), deterministic per-sample seeding and
resumable sampling (`seeded.py`), RGB image reading that names corrupt files (`images.py`), collation that
drops and reports them (`collate.py`), loader worker options and fixed subsets (`loader_options.py`), and
write-once embedded datasets (`write_once.py`). Task-specific datasets, transforms and loaders live in their
task's folder (`dynconv/tasks/<task>/`)."""

from dynconv.data.collate import collate_skip_corrupt, split_corrupt
from dynconv.data.datasets import DATASETS, DatasetSpec, names_for, register_dataset
from dynconv.data.images import CorruptImageError, CorruptSample, load_rgb
from dynconv.data.seeded import EpochSampler, SeededDataset

__all__ = ["DATASETS", "CorruptImageError", "CorruptSample", "DatasetSpec", "EpochSampler", "SeededDataset",
           "collate_skip_corrupt", "load_rgb", "names_for", "register_dataset", "split_corrupt"]
