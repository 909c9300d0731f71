"""Dataset sources: read images from any supported source into an in-memory :class:`ImageDataset`.

Sources accepted by :func:`load_dataset` and the value ranges they must hold:

=====================================  ==========================================================
``"digits"`` (the bundled default)     scikit-learn's 1,797 real 8x8 handwritten digits (in its
                                       wheel, no download); pixel values 0..16 map to [-1, 1].
a folder of images                     PNG/JPEG/BMP/WebP, searched recursively, in sorted path
                                       order; 8-bit pixels 0..255. Alpha is dropped. Labels from
                                       class folders or an EDM ``dataset.json``.
a ``.zip`` of images                   EDM's ``dataset_tool.py`` format: images in sorted name
                                       order, labels from its ``dataset.json``.
a prepared cache folder                written by ``ddpm-fast prepare-data`` (``prepare_data``):
                                       memory-mapped, not read into memory.
a CIFAR-10 python-batch folder         detected by its ``data_batch_*`` files (or a
                                       ``cifar-10-batches-py`` subfolder): pickles with
                                       ``b'data'`` (N, 3072) uint8 and ``b'labels'``.
``.npz`` / ``.npy`` file               as for a NumPy array below; an ``.npz`` uses its only
                                       array, else ``arr_0``, else ``array_key``.
NumPy array                            uint8 -> NHWC 0..255 (the ``samples.npz`` / guided-diffusion
                                       layout); floating -> NCHW in ``value_range``.
torch.Tensor                           always NCHW: uint8 0..255, or floating in ``value_range``.
torch Dataset                          items are images or (image, label) tuples; an image is a PIL
                                       image, a (C, H, W) tensor, or an array as above.
=====================================  ==========================================================

The one rule for floating-point input: it is taken to lie in ``value_range``, default (-1, 1) (the
range DDPM trains in), and is mapped linearly onto [-1, 1]. Data in [0, 1] (torchvision's ToTensor)
needs ``value_range=(0, 1)``; values outside the range are an error, not silently clipped.
A 3-D array or tensor (N, H, W) is a stack of grayscale images.

Everything comes out as float32 NCHW in [-1, 1]. 8-bit sources stay uint8 in memory (a quarter of the
bytes; CIFAR-10 is 150 MB) and are converted per batch: ``v / 127.5 - 1`` maps 0 -> -1 and 255 -> 1.
Image files are decoded in parallel processes (:mod:`.decode`); for data decoded once and shared by
many runs and processes see :mod:`.cache`.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .convert import array_to_nchw, check_channels_arg, check_image_size_arg, convert_channels, resize_nchw
from .dataset import ImageDataset
from .decode import _GRAYSCALE_MODES, decode_images, list_image_files, pil_to_uint8_hwc
from .prepared import is_prepared, open_prepared

__all__ = ["load_dataset", "load_digits_images", "read_cifar", "read_array_file", "array_file_dtype",
           "find_cifar_folder", "SOURCES_HINT"]

SOURCES_HINT = ("pass 'digits', a folder of images, a .zip of images, a CIFAR-10 batch folder, a .npz/.npy file "
                "or a folder made by ddpm-fast prepare-data")
_SOURCES_HINT = SOURCES_HINT


def _finish(x: torch.Tensor, *, image_size, channels, flip, source, labels=None) -> ImageDataset:
    x = convert_channels(x, channels)
    if image_size is not None:
        x = resize_nchw(x, image_size)
    return ImageDataset(x, labels=labels, flip=flip, source=source)


# --------------------------------------------------------------------------------------------------
# Loaders


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real handwritten digits: float32 (1797, 1, 8, 8) in [-1, 1] and int64 labels.

    The pixel values are integers 0..16 (16 = full ink); v / 8 - 1 maps them exactly onto [-1, 1].
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1).div_(8.0).sub_(1.0)
    return images, torch.from_numpy(bunch.target.astype(np.int64))


def _load_image_files(path: Path, image_size, channels, flip, workers=None) -> ImageDataset:
    files = list_image_files(path, _SOURCES_HINT)
    pixels, _ = decode_images(files, image_size=image_size, channels=channels, workers=workers)
    labels = None if files.labels is None else torch.from_numpy(files.labels)
    return ImageDataset.from_nhwc(torch.from_numpy(pixels), labels=labels, flip=flip, source=files.describe())


class _CifarUnpickler(pickle.Unpickler):
    """Only the globals a CIFAR-10 batch needs (NumPy array reconstruction): a batch file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means the same thing to the user
        raise DataError(f"cannot read CIFAR-10 batch file {path}: {exc}; re-download or replace it") from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 batch file {path} holds a {type(batch).__name__}, not a dict; replace it")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    data = None if data is None else np.asarray(data)
    if data is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = "nothing" if data is None else f"{data.dtype} {data.shape}"
        raise DataError(f"CIFAR-10 batch file {path} must hold b'data' as uint8 (N, 3072), got {got}; replace it")
    if labels is None or len(labels) != data.shape[0]:
        raise DataError(f"CIFAR-10 batch file {path} must hold b'labels' with one label per image; replace it")
    return data, np.asarray(labels, dtype=np.int64)


def _cifar_folder(folder: Path) -> Path | None:
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if candidate.is_dir() and (any(candidate.glob("data_batch_*")) or (candidate / "test_batch").is_file()):
            return candidate
    return None


def read_cifar(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A CIFAR-10 batch folder's ``split``: uint8 (N, 3, 32, 32), int64 labels (N,) and a description."""
    train = sorted((p for p in folder.glob("data_batch_*") if re.fullmatch(r"data_batch_\d+", p.name)),
                   key=lambda p: int(p.name.rsplit("_", 1)[1]))
    test = [folder / "test_batch"] if (folder / "test_batch").is_file() else []
    files = {"train": train, "test": test, "all": train + test}.get(split)
    if files is None:
        raise DataError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not files:
        raise DataError(f"the CIFAR-10 folder {folder} has no {split} batch files "
                        f"({'data_batch_1..5' if split != 'test' else 'test_batch'}); pick another split")
    parts = [_read_cifar_batch(p) for p in files]
    data = np.concatenate([d for d, _ in parts])
    labels = torch.from_numpy(np.concatenate([lab for _, lab in parts]))
    # rows are 1024 red, then green, then blue values, each 32x32 row-major: already NCHW
    return torch.from_numpy(data).view(-1, 3, 32, 32), labels, f"CIFAR-10 {split} batches in {folder}"


def find_cifar_folder(folder: Path) -> Path | None:
    """The CIFAR-10 python-batch folder at or just under ``folder``, or None."""
    return _cifar_folder(folder)


def _load_cifar(folder: Path, split: str, image_size, channels, flip) -> ImageDataset:
    x, labels, source = read_cifar(folder, split)
    return _finish(x, image_size=image_size, channels=channels, flip=flip, labels=labels, source=source)


def _open_array_file(path: Path, mmap: bool):
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap and path.suffix.lower() == ".npy" else None)
    except Exception as exc:
        raise DataError(f"cannot read array file {path}: {exc}; save it with np.save / np.savez") from None


def _npz_key(path: Path, keys: list[str], array_key) -> str:
    """Which array of an ``.npz`` holds the images: ``array_key``, the only one, else ``arr_0``."""
    if array_key is not None:
        if array_key not in keys:
            raise DataError(f"{path} has no array {array_key!r}; its arrays are {keys}")
        return array_key
    if len(keys) == 1:
        return keys[0]
    if "arr_0" in keys:
        return "arr_0"
    raise DataError(f"{path} holds several arrays {keys} and none is 'arr_0': pass array_key=<name>")


def read_array_file(path: Path, array_key=None, *, mmap: bool = False) -> tuple[np.ndarray, str]:
    """The image array in a ``.npy`` (memory-mapped with ``mmap``) or ``.npz`` file, and a name for messages."""
    loaded = _open_array_file(path, mmap)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            key = _npz_key(path, list(loaded.keys()), array_key)
            try:
                arr = loaded[key]
            except Exception as exc:
                raise DataError(f"cannot read array {key!r} from {path}: {exc}") from None
        return arr, f"array {key!r} in {path}"
    return loaded, f"array file {path}"


def array_file_dtype(path: Path, array_key=None) -> tuple[np.dtype, str]:
    """The dtype of the image array in a ``.npy`` or ``.npz`` file, from its header only (an ``.npz`` member
    is not decompressed), and a name for messages. Raises DataError as :func:`read_array_file`."""
    loaded = _open_array_file(path, mmap=True)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return loaded.dtype, f"array file {path}"
    with loaded:
        key = _npz_key(path, list(loaded.keys()), array_key)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        try:
            with loaded.zip.open(key + ".npy") as member:
                reader = readers.get(np.lib.format.read_magic(member))
                dtype = reader(member)[2] if reader else loaded[key].dtype  # format 3.0 (rare): read it whole
        except Exception as exc:
            raise DataError(f"cannot read array {key!r} from {path}: {exc}") from None
    return np.dtype(dtype), f"array {key!r} in {path}"


def _load_array_file(path: Path, array_key, value_range, image_size, channels, flip) -> ImageDataset:
    arr, name = read_array_file(path, array_key)
    x = array_to_nchw(arr, name, value_range, numpy_layout=True)
    return _finish(x, image_size=image_size, channels=channels, flip=flip, source=str(path))


def _item_to_nchw(item, index: int, value_range) -> torch.Tensor:
    from PIL import Image

    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    name = f"dataset item {index}"
    if isinstance(item, Image.Image):
        mode = "L" if item.mode in _GRAYSCALE_MODES else "RGB"
        return torch.tensor(pil_to_uint8_hwc(item, mode, None)).permute(2, 0, 1).unsqueeze(0).contiguous()
    if isinstance(item, np.ndarray):
        return array_to_nchw(item[None], name, value_range, numpy_layout=True)
    if isinstance(item, torch.Tensor):
        if item.ndim == 2:
            item = item.unsqueeze(0)
        return array_to_nchw(item[None], name, value_range, numpy_layout=False)
    raise DataError(f"{name} is a {type(item).__name__}: items must be PIL images, (C, H, W) tensors or arrays, "
                    "or (image, label) tuples of those")


def _load_torch_dataset(ds, value_range, image_size, channels, flip) -> ImageDataset:
    try:
        n = len(ds)
    except TypeError:
        raise DataError("the dataset has no len(): pass a map-style torch Dataset, a tensor or a path") from None
    if n == 0:
        raise DataError("no images found: the given dataset is empty")
    parts = [_item_to_nchw(ds[i], i, value_range) for i in range(n)]
    if any(p.dtype != parts[0].dtype for p in parts):
        parts = [p.to(torch.float32).div_(127.5).sub_(1.0) if p.dtype == torch.uint8 else p for p in parts]
    if channels is None:
        channels = 3 if any(p.shape[1] == 3 for p in parts) else 1
    parts = [convert_channels(p, channels) for p in parts]
    if image_size is not None:
        parts = [resize_nchw(p, image_size) for p in parts]
    elif any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        other = next(i for i, p in enumerate(parts) if p.shape[1:] != parts[0].shape[1:])
        raise DataError(f"dataset items have different sizes (item 0 is {tuple(parts[0].shape[1:])}, item {other} is "
                        f"{tuple(parts[other].shape[1:])}): pass image_size=N to resize and center-crop them")
    return ImageDataset(torch.cat(parts), flip=flip, source=f"{type(ds).__name__} ({n} items)")


def load_dataset(source="digits", *, image_size: int | None = None, channels: int | None = None,
                 flip: bool = False, split: str = "train", array_key: str | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), workers: int | None = None) -> ImageDataset:
    """Load training images from any supported source (see the module docstring for the formats).

    Args:
        source: ``"digits"`` (exactly that string; use ``"./digits"`` for a folder of that name), a path
            (str or Path) to an image folder, a ``.zip`` of images (EDM's format), a CIFAR-10 batch folder, a
            ``.npz``/``.npy`` file or a prepared cache folder (memory-mapped), a
            torch.Tensor or np.ndarray of images, a torch Dataset, or an :class:`ImageDataset`.
        image_size: resize the shorter side to this and center-crop to image_size x image_size; None keeps
            the source's size (image folders must then hold images of one size).
        channels: 1 (grayscale) or 3 (RGB) to convert to; None keeps the source's (an image folder is RGB
            unless every image is grayscale).
        flip: random horizontal flips in the :class:`BatchStream`.
        split: CIFAR-10 only: ``"train"`` (data_batch_*), ``"test"`` (test_batch) or ``"all"``.
        array_key: ``.npz`` only: which array to read.
        value_range: the range floating-point input lies in; it is mapped onto [-1, 1].
        workers: processes decoding image files (None: one per CPU, up to 16; small folders decode here).

    Returns:
        an :class:`ImageDataset` serving float32 (C, H, W) images in [-1, 1].

    Raises:
        DataError: a missing path, no images, mixed sizes without ``image_size``, an unreadable file
            (named), or an array of the wrong rank, dtype or range.
    """
    check_image_size_arg(image_size)
    check_channels_arg(channels)
    if isinstance(source, ImageDataset):
        return _finish(source.nchw(), image_size=image_size, channels=channels, flip=flip or source.flip,
                       labels=source.labels, source=source.source)
    if isinstance(source, str) and source == "digits":
        images, labels = load_digits_images()
        return _finish(images, image_size=image_size, channels=channels, flip=flip, labels=labels,
                       source="sklearn digits (1,797 real 8x8 handwritten digits)")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"dataset path {path} does not exist; {_SOURCES_HINT}")
        if is_prepared(path):
            dataset = open_prepared(path, flip=flip)
            if image_size is None or image_size == dataset.image_size:
                if channels is None or channels == dataset.channels:
                    return dataset
            return _finish(dataset.nchw(), image_size=image_size, channels=channels, flip=flip,
                           labels=dataset.labels, source=dataset.source)
        if path.is_dir():
            cifar = _cifar_folder(path)
            if cifar is not None:
                return _load_cifar(cifar, split, image_size, channels, flip)
            return _load_image_files(path, image_size, channels, flip, workers)
        if path.suffix.lower() == ".zip":
            return _load_image_files(path, image_size, channels, flip, workers)
        if path.suffix.lower() in (".npz", ".npy"):
            return _load_array_file(path, array_key, value_range, image_size, channels, flip)
        raise DataError(f"unsupported dataset file {path}: {_SOURCES_HINT}")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        x = array_to_nchw(source.detach().cpu() if isinstance(source, torch.Tensor) else source,
                           "the given array" if isinstance(source, np.ndarray) else "the given tensor",
                           value_range, numpy_layout=isinstance(source, np.ndarray))
        return _finish(x, image_size=image_size, channels=channels, flip=flip,
                       source=f"in-memory {type(source).__name__}")
    if isinstance(source, torch.utils.data.Dataset) or hasattr(source, "__getitem__"):
        return _load_torch_dataset(source, value_range, image_size, channels, flip)
    raise DataError(f"cannot load a dataset from a {type(source).__name__}: {_SOURCES_HINT}, "
                    "an array/tensor of images, or a torch Dataset")
