"""Data parts every task shares: the DATASETS registry (`datasets.py`), deterministic per-sample seeding and
resumable sampling (`seeded.py`), RGB image reading that names corrupt files (`images.py`), collation that
drops and reports them (`collate.py`), a loader that applies data.strict to them (`checked_loader.py`), the
errors a dataset on disk can cause (`errors.py`), loader worker options and fixed subsets
(`loader_options.py`), write-once embedded datasets (`write_once.py`) and the restricted unpickler for
untrusted pickles (`safe_pickle.py`). Task-specific datasets, transforms and loaders live in their task's folder
(`dynconv/tasks/<task>/`)."""

from dynconv.data.checked_loader import CheckedDataLoader
from dynconv.data.collate import SkippedFile, collate_skip_corrupt, split_corrupt
from dynconv.data.datasets import DATASETS, DatasetSpec, names_for, register_dataset
from dynconv.data.errors import DataError, ForeignFolderError, MissingFilesError, UnreadableImageError
from dynconv.data.images import CorruptImageError, CorruptSample, load_rgb
from dynconv.data.seeded import EpochSampler, SeededDataset

__all__ = ["DATASETS", "CheckedDataLoader", "CorruptImageError", "CorruptSample", "DataError", "DatasetSpec",
           "EpochSampler", "ForeignFolderError", "MissingFilesError", "SeededDataset", "SkippedFile",
           "UnreadableImageError", "collate_skip_corrupt", "load_rgb", "names_for", "register_dataset",
           "split_corrupt"]
