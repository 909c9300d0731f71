"""The prepared-data format, read side: a folder holding

- ``images.npy``: uint8 (N, H, W, C), the decoded, converted and resized images (a plain NumPy ``.npy``,
  so ``np.load(..., mmap_mode="r")`` reads it anywhere);
- ``labels.npy``: int64 (N,) class labels, where the source has them;
- ``meta.json``: what it is (see :func:`read_meta`), written last: a folder without it is not prepared.

:func:`open_prepared` memory-maps the images: processes on one machine share one copy through the page
cache, and a dataset larger than RAM still trains. (:mod:`.cache` writes these folders.)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import ImageDataset

__all__ = ["FORMAT", "VERSION", "IMAGES_FILE", "LABELS_FILE", "META_FILE", "is_prepared", "read_meta",
           "open_prepared"]

FORMAT = "ddpm-fast-prepared-data"
VERSION = 1
IMAGES_FILE, LABELS_FILE, META_FILE = "images.npy", "labels.npy", "meta.json"


def is_prepared(path) -> bool:
    """Whether ``path`` is a folder with a prepared-data ``meta.json``."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file()


def read_meta(path) -> dict:
    """The ``meta.json`` of a prepared folder: format, version, source, source_fingerprint, options
    (image_size, channels, split, array_key), resize, num_images, height, width, channels_stored,
    labels (None or {"count", "from", "class_names"}), sha256 (of the image bytes, then the label bytes)."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path / META_FILE}: {exc}; prepare the data again "
                        "(ddpm-fast prepare-data SOURCE --out DIR)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a ddpm-fast prepared-data folder; prepare it with ddpm-fast prepare-data")
    if meta.get("version") != VERSION:
        raise DataError(f"{path} holds prepared data of version {meta.get('version')}, this ddpm-fast reads "
                        f"version {VERSION}: prepare the data again")
    return meta


def open_prepared(path, *, flip: bool = False, in_memory: bool = False) -> ImageDataset:
    """A prepared folder as an :class:`ImageDataset`: memory-mapped (default) or read into memory.

    Returns a dataset whose ``pixels`` are the uint8 (N, H, W, C) images as stored.
    """
    path = Path(path)
    meta = read_meta(path)
    images_path = path / IMAGES_FILE
    try:
        pixels = np.load(images_path, mmap_mode=None if in_memory else "r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {images_path}: {exc}; prepare the data again") from None
    expected = (meta["num_images"], meta["height"], meta["width"], meta["channels_stored"])
    if pixels.dtype != np.uint8 or tuple(pixels.shape) != tuple(expected):
        raise DataError(f"{images_path} holds {pixels.dtype} {pixels.shape}, but {META_FILE} says uint8 {expected}: "
                        "prepare the data again")
    labels = None
    if meta.get("labels"):
        labels = torch.from_numpy(np.load(path / LABELS_FILE, allow_pickle=False).astype(np.int64))
    with warnings.catch_warnings():
        # read-only by design: every write would go to the shared file; torch only reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(pixels)
    source = f"{meta['source']} (prepared in {path})"
    return ImageDataset.from_nhwc(tensor, labels=labels, flip=flip, source=source,
                                  mapped=None if in_memory else str(images_path))
