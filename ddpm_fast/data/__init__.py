"""Training data, one job per module:

- :mod:`.sources`: read any supported source (digits, image folder, EDM zip, CIFAR-10 batches, npz/npy,
  arrays, torch Datasets) into an in-memory :class:`ImageDataset`;
- :mod:`.decode`: decode image files in parallel processes into one uint8 NHWC array;
- :mod:`.cache` / :mod:`.prepared`: decode once into a prepared folder (uint8 NHWC ``images.npy`` +
  ``meta.json``), found again by source and options, and memory-mapped by every process that trains on it;
- :mod:`.dataset`: the :class:`ImageDataset` (in memory or memory-mapped) and the uint8 -> float conversion;
- :mod:`.batches`: seeded, resumable batches assembled ahead of the step (:class:`BatchStream`);
- :mod:`.writing`: samples to uint8 and PNG files.

Every name the package imported from the old single ``data.py`` is importable from here.
"""

from .batches import BatchStream, epoch_plan
from .cache import CACHE_ENV, FloatSourceError, cache_path_for, cached_dataset, default_cache_root, prepare_data
from .dataset import ImageDataset, to_float_nchw
from .decode import IMAGE_EXTENSIONS
from .prepared import is_prepared, open_prepared, read_meta
from .sources import load_dataset, load_digits_images
from .writing import save_grid, save_pngs, to_uint8_nhwc

__all__ = [
    "ImageDataset",
    "BatchStream",
    "load_dataset",
    "load_digits_images",
    "to_uint8_nhwc",
    "save_grid",
    "save_pngs",
    "IMAGE_EXTENSIONS",
    "prepare_data",
    "cached_dataset",
    "open_prepared",
    "is_prepared",
    "read_meta",
    "default_cache_root",
    "cache_path_for",
    "FloatSourceError",
    "CACHE_ENV",
    "epoch_plan",
    "to_float_nchw",
]
