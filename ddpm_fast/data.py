"""Training data: load images from any supported source into one in-memory NCHW tensor, draw seeded,
resumable random batches from it, and write images back out as PNGs.

Sources accepted by :func:`load_dataset` and the value ranges they must hold:

=====================================  ==========================================================
``"digits"`` (the bundled default)     scikit-learn's 1,797 real 8x8 handwritten digits (in its
                                       wheel, no download); pixel values 0..16 map to [-1, 1].
a folder of images                     PNG/JPEG/BMP/WebP, searched recursively, in sorted path
                                       order; 8-bit pixels 0..255. Alpha is dropped.
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
"""

from __future__ import annotations

import math
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checks import host_to_device
from .errors import DataError

__all__ = [
    "ImageDataset",
    "BatchStream",
    "load_dataset",
    "load_digits_images",
    "to_uint8_nhwc",
    "save_grid",
    "save_pngs",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}
_SOURCES_HINT = "pass 'digits', a folder of images, a CIFAR-10 batch folder, or a .npz/.npy file"


# --------------------------------------------------------------------------------------------------
# The in-memory dataset


class ImageDataset(torch.utils.data.Dataset):
    """N images held in memory as one NCHW tensor; items and batches come out float32 in [-1, 1].

    Args:
        images: (N, C, H, W) tensor, either uint8 (pixel values 0..255) or float32 already in [-1, 1].
        labels: optional int64 (N,) class labels (kept for the digits and CIFAR-10 sources).
        flip: whether a :class:`BatchStream` over this dataset applies random horizontal flips.
        source: a short description of where the images came from, for :meth:`describe`.

    Use :func:`load_dataset` to build one from a file, folder or array.
    """

    def __init__(self, images: torch.Tensor, *, labels: torch.Tensor | None = None, flip: bool = False,
                 source: str = "tensor"):
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise DataError("ImageDataset needs a 4-D (N, C, H, W) tensor; build one with load_dataset(...)")
        if images.dtype not in (torch.uint8, torch.float32):
            raise DataError(f"ImageDataset stores uint8 or float32 images, got {images.dtype}; "
                            "build one with load_dataset(...)")
        if images.shape[0] == 0:
            raise DataError(f"no images in {source}: the dataset is empty")
        if labels is not None and (labels.ndim != 1 or labels.shape[0] != images.shape[0]):
            raise DataError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self._storage = images.contiguous()
        self.labels = labels
        self.flip = bool(flip)
        self.source = source

    # shape ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._storage.shape[0]

    @property
    def num_images(self) -> int:
        return self._storage.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self._storage.shape[1:])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return self._storage.shape[1]

    @property
    def image_size(self) -> int | tuple[int, int]:
        """H when the images are square (the usual case), else (H, W)."""
        h, w = self._storage.shape[2:]
        return h if h == w else (h, w)

    @property
    def device(self) -> torch.device:
        return self._storage.device

    @property
    def storage_dtype(self) -> torch.dtype:
        """uint8 for 8-bit sources (converted per batch), float32 otherwise."""
        return self._storage.dtype

    # data -----------------------------------------------------------------------------------------
    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(127.5).sub_(1.0)
        return x.clone()

    def __getitem__(self, index: int) -> torch.Tensor:
        """One image, float32 (C, H, W) in [-1, 1], never flipped."""
        return self._to_float(self._storage[index])

    def gather(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as a float32 (B, C, H, W) tensor in [-1, 1] on the dataset's device."""
        idx = torch.as_tensor(indices, dtype=torch.int64).to(self._storage.device)
        return self._to_float(self._storage.index_select(0, idx))

    @property
    def images(self) -> torch.Tensor:
        """All images as one float32 (N, C, H, W) tensor in [-1, 1] (a fresh copy)."""
        return self._to_float(self._storage)

    def to(self, device: torch.device | str) -> "ImageDataset":
        """The same dataset with its images stored on ``device`` (batches are then gathered there)."""
        labels = None if self.labels is None else self.labels.to(device)
        return ImageDataset(self._storage.to(device), labels=labels, flip=self.flip, source=self.source)

    def describe(self) -> str:
        """One line: count, image shape, storage and source."""
        c, h, w = self.shape
        kind = "uint8 0..255" if self.storage_dtype == torch.uint8 else "float32"
        return (f"{self.num_images} images of {c}x{h}x{w} (CxHxW) from {self.source}; stored {kind} on "
                f"{self.device}, served float32 in [-1, 1]; random horizontal flip {'on' if self.flip else 'off'}")

    def __repr__(self) -> str:
        c, h, w = self.shape
        return (f"ImageDataset(num_images={self.num_images}, shape=({c}, {h}, {w}), "
                f"source={self.source!r}, flip={self.flip})")


# --------------------------------------------------------------------------------------------------
# Seeded, resumable batches


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) into independent streams: no collisions between nearby pairs.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


class BatchStream:
    """An endless stream of random batches, a pure function of (seed, number of batches drawn).

    Each epoch visits a fresh random permutation of the dataset in ``len(dataset) // batch_size`` full
    batches (the remainder of a permutation is skipped; it is covered by other epochs). The permutation
    and, with ``flip``, one coin per image come from a torch generator seeded by (seed, epoch), so
    :meth:`state_dict` is a handful of ints and a resumed run draws exactly the batches an
    uninterrupted run would have drawn.

    Args:
        dataset: an :class:`ImageDataset` (anything else goes through :func:`load_dataset`).
        batch_size: images per batch; must not exceed the number of images.
        seed: any int >= 0.
        flip: random horizontal flips; None takes ``dataset.flip``.
        device: where batches are delivered; None keeps the dataset's device.

    ``next(stream)`` returns a float32 (batch_size, C, H, W) tensor in [-1, 1].
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, *, flip: bool | None = None,
                 device: torch.device | str | None = None):
        if not isinstance(dataset, ImageDataset):
            dataset = load_dataset(dataset)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be an int >= 0, got {seed!r}")
        if len(dataset) < batch_size:
            raise DataError(f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size}: "
                            f"use a batch size of at most {len(dataset)} or add images")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.flip = dataset.flip if flip is None else bool(flip)
        self.device = None if device is None else torch.device(device)
        self.batches_per_epoch = len(dataset) // batch_size
        self.epoch = 0
        self.position = 0  # batches already drawn in the current epoch
        self._cached_epoch = -1
        self._order = self._flips = None

    @property
    def batches_drawn(self) -> int:
        return self.epoch * self.batches_per_epoch + self.position

    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._cached_epoch != self.epoch:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._order = torch.randperm(len(self.dataset), generator=g)
            self._flips = torch.rand(len(self.dataset), generator=g) < 0.5 if self.flip else None
            self._cached_epoch = self.epoch
        return self._order, self._flips

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        order, flips = self._epoch_plan()
        lo = self.position * self.batch_size
        batch = self.dataset.gather(order[lo:lo + self.batch_size])
        if flips is not None:
            mask = flips[lo:lo + self.batch_size].to(batch.device).view(-1, 1, 1, 1)
            batch = torch.where(mask, batch.flip(-1), batch)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self.device is not None:
            batch = host_to_device(batch, self.device)
        return batch

    def state_dict(self) -> dict:
        """Plain ints and bools (JSON-able): everything needed to continue the stream exactly."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                "num_images": len(self.dataset), "flip": self.flip}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; the dataset, batch size and flip setting must be the same."""
        try:
            num_images, batch_size, flip = int(state["num_images"]), int(state["batch_size"]), bool(state["flip"])
            seed, epoch, position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"batch stream state is missing or has a bad entry ({exc}); "
                            "pass a dict from BatchStream.state_dict()") from None
        if num_images != len(self.dataset) or batch_size != self.batch_size or flip != self.flip:
            raise DataError(
                f"cannot resume the batch stream: it was saved for {num_images} images, batch size {batch_size}, "
                f"flip {flip}, but this run has {len(self.dataset)} images, batch size {self.batch_size}, "
                f"flip {self.flip}; resume with the same dataset and settings")
        if not 0 <= position < self.batches_per_epoch or epoch < 0 or seed < 0:
            raise DataError(f"batch stream state out of range (epoch {epoch}, position {position}); "
                            "pass a dict from BatchStream.state_dict()")
        self.seed, self.epoch, self.position = seed, epoch, position
        self._cached_epoch = -1


# --------------------------------------------------------------------------------------------------
# Conversions shared by the loaders


def _resize_nchw(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (bicubic, antialiased), then center-crop to size x size."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    was_uint8 = x.dtype == torch.uint8
    y = F.interpolate(x.to(torch.float32), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    y = y[:, :, top:top + size, left:left + size]
    if was_uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y.clamp_(-1.0, 1.0).contiguous()


def _convert_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Match the requested channel count: gray -> RGB repeats, RGB -> gray uses Pillow's ITU-R 601 luma."""
    c = x.shape[1]
    if channels is None or channels == c:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
        y = (x.to(torch.float32) * weights).sum(1, keepdim=True)
        return y.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y
    raise DataError(f"cannot convert {c}-channel images to {channels} channels; use channels=1 or 3")


def _check_channels_arg(channels) -> None:
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale), 3 (RGB) or None (keep the source's), got {channels!r}")


def _check_image_size_arg(image_size) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive int (images are resized and center-cropped to "
                        f"image_size x image_size) or None, got {image_size!r}")


def _array_to_nchw(arr, name: str, value_range: tuple[float, float], *, numpy_layout: bool) -> torch.Tensor:
    """An array or tensor of images -> uint8 or float32 NCHW tensor (floats mapped onto [-1, 1]).

    ``numpy_layout``: uint8 NumPy data is NHWC, float NumPy data NCHW; torch tensors are always NCHW.
    """
    x = torch.from_numpy(np.ascontiguousarray(arr)) if isinstance(arr, np.ndarray) else arr
    if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or x.dtype == torch.uint8):
        raise DataError(f"{name} has dtype {x.dtype}: images must be uint8 (0..255) or floating point "
                        f"(in {tuple(value_range)}); convert it, e.g. .astype(np.uint8)")
    if x.ndim == 3:
        x = x.unsqueeze(-1 if (numpy_layout and x.dtype == torch.uint8) else 1)
    if x.ndim != 4:
        raise DataError(f"{name} has shape {tuple(x.shape)}: images must be 4-D (N, C, H, W) "
                        "(uint8 NumPy arrays: (N, H, W, C)) or 3-D (N, H, W) grayscale")
    if numpy_layout and x.dtype == torch.uint8:
        if x.shape[-1] not in (1, 3):
            raise DataError(f"{name} is a uint8 array of shape {tuple(x.shape)}: uint8 arrays are read as NHWC "
                            "with 1 or 3 channels last; transpose it, or pass a float NCHW array in [-1, 1]")
        x = x.permute(0, 3, 1, 2)
    elif x.shape[1] not in (1, 3):
        kind = "uint8 tensor" if x.dtype == torch.uint8 else "float array"
        raise DataError(f"{name} is a {kind} of shape {tuple(x.shape)}: it is read as NCHW with 1 or 3 channels "
                        "at dim 1; transpose it (x.permute(0, 3, 1, 2) for NHWC)")
    if x.shape[0] == 0:
        raise DataError(f"{name} holds no images (shape {tuple(x.shape)})")
    x = x.contiguous()
    if x.dtype == torch.uint8:
        return x
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise DataError(f"{name} contains NaN or infinite values; remove or fix those images")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise DataError(f"value_range must be (low, high) with low < high, got {tuple(value_range)}")
    xmin, xmax = float(x.min()), float(x.max())
    tol = 1e-4 * (hi - lo)  # float rounding of already-scaled data
    if xmin < lo - tol or xmax > hi + tol:
        raise DataError(f"{name} holds floats in [{xmin:.4g}, {xmax:.4g}], outside the expected range "
                        f"[{lo:g}, {hi:g}]: "
                        "pass uint8 pixels 0..255, float images in [-1, 1], or set value_range to the data's range")
    if (lo, hi) == (-1.0, 1.0) and xmin >= 0.0 and xmax > 0.0:
        warnings.warn(f"{name} holds floats in [{xmin:.3g}, {xmax:.3g}] with nothing below 0, but float images are "
                      "read as [-1, 1]; if they are [0, 1] images pass value_range=(0, 1)", UserWarning, stacklevel=3)
    x = (x - lo) * (2.0 / (hi - lo)) - 1.0
    return x.clamp_(-1.0, 1.0)


def _finish(x: torch.Tensor, *, image_size, channels, flip, source, labels=None) -> ImageDataset:
    x = _convert_channels(x, channels)
    if image_size is not None:
        x = _resize_nchw(x, image_size)
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


def _find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()  # decode now, so a truncated file fails here with its name
        return img
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image file {path}: {exc}; remove or replace it") from None


def _pil_to_uint8_nchw(images: list, names: list[str], where: str, image_size, channels) -> torch.Tensor:
    """PIL images -> uint8 (N, C, H, W); all the same size unless image_size is given."""
    from PIL import Image, ImageOps

    if channels is None:
        channels = 1 if all(img.mode in _GRAYSCALE_MODES for img in images) else 3
    mode = "L" if channels == 1 else "RGB"
    if image_size is None:
        sizes = {img.size for img in images}
        if len(sizes) > 1:
            first = images[0].size
            other = next(i for i, img in enumerate(images) if img.size != first)
            raise DataError(
                f"images in {where} have different sizes ({names[0]} is {first[0]}x{first[1]}, {names[other]} is "
                f"{images[other].size[0]}x{images[other].size[1]}): pass an image size (image_size=N, --image-size N) "
                "to resize and center-crop them")
    arrays = []
    for img in images:
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F") and mode == "L":
            # 16-bit and float grayscale: Pillow's convert("L") clips instead of scaling
            a = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if img.mode.startswith("I") and a.max() > 255 else 255.0
            img = Image.fromarray(np.clip(a * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")
        img = img.convert(mode)
        if image_size is not None and img.size != (image_size, image_size):
            img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BICUBIC)
        a = np.asarray(img, dtype=np.uint8)
        arrays.append(a[:, :, None] if a.ndim == 2 else a)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _load_image_folder(folder: Path, image_size, channels, flip) -> ImageDataset:
    paths = _find_images(folder)
    if not paths:
        raise DataError(f"no images found in {folder} (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}); {_SOURCES_HINT}")
    images = [_open_image(p) for p in paths]
    names = [str(p.relative_to(folder)) for p in paths]
    x = _pil_to_uint8_nchw(images, names, str(folder), image_size, channels)
    return ImageDataset(x, flip=flip, source=f"image folder {folder}")


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


def _load_cifar(folder: Path, split: str, image_size, channels, flip) -> ImageDataset:
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
    x = torch.from_numpy(data).view(-1, 3, 32, 32)
    return _finish(x, image_size=image_size, channels=channels, flip=flip, labels=labels,
                   source=f"CIFAR-10 {split} batches in {folder}")


def _load_array_file(path: Path, array_key, value_range, image_size, channels, flip) -> ImageDataset:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot read array file {path}: {exc}; save it with np.save / np.savez") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if array_key is not None:
                if array_key not in keys:
                    raise DataError(f"{path} has no array {array_key!r}; its arrays are {keys}")
                key = array_key
            elif len(keys) == 1:
                key = keys[0]
            elif "arr_0" in keys:
                key = "arr_0"
            else:
                raise DataError(f"{path} holds several arrays {keys} and none is 'arr_0': pass array_key=<name>")
            try:
                arr = loaded[key]
            except Exception as exc:
                raise DataError(f"cannot read array {key!r} from {path}: {exc}") from None
        name = f"array {key!r} in {path}"
    else:
        arr, name = loaded, f"array file {path}"
    x = _array_to_nchw(arr, name, value_range, numpy_layout=True)
    return _finish(x, image_size=image_size, channels=channels, flip=flip, source=str(path))


def _item_to_nchw(item, index: int, value_range) -> torch.Tensor:
    from PIL import Image

    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    name = f"dataset item {index}"
    if isinstance(item, Image.Image):
        return _pil_to_uint8_nchw([item], [name], name, None, None)
    if isinstance(item, np.ndarray):
        return _array_to_nchw(item[None], name, value_range, numpy_layout=True)
    if isinstance(item, torch.Tensor):
        if item.ndim == 2:
            item = item.unsqueeze(0)
        return _array_to_nchw(item[None], name, value_range, numpy_layout=False)
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
    parts = [_convert_channels(p, channels) for p in parts]
    if image_size is not None:
        parts = [_resize_nchw(p, image_size) for p in parts]
    elif any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        other = next(i for i, p in enumerate(parts) if p.shape[1:] != parts[0].shape[1:])
        raise DataError(f"dataset items have different sizes (item 0 is {tuple(parts[0].shape[1:])}, item {other} is "
                        f"{tuple(parts[other].shape[1:])}): pass image_size=N to resize and center-crop them")
    return ImageDataset(torch.cat(parts), flip=flip, source=f"{type(ds).__name__} ({n} items)")


def load_dataset(source="digits", *, image_size: int | None = None, channels: int | None = None,
                 flip: bool = False, split: str = "train", array_key: str | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0)) -> ImageDataset:
    """Load training images from any supported source (see the module docstring for the formats).

    Args:
        source: ``"digits"`` (exactly that string; use ``"./digits"`` for a folder of that name), a path
            (str or Path) to an image folder, a CIFAR-10 batch folder or a ``.npz``/``.npy`` file, a
            torch.Tensor or np.ndarray of images, a torch Dataset, or an :class:`ImageDataset`.
        image_size: resize the shorter side to this and center-crop to image_size x image_size; None keeps
            the source's size (image folders must then hold images of one size).
        channels: 1 (grayscale) or 3 (RGB) to convert to; None keeps the source's (an image folder is RGB
            unless every image is grayscale).
        flip: random horizontal flips in the :class:`BatchStream`.
        split: CIFAR-10 only: ``"train"`` (data_batch_*), ``"test"`` (test_batch) or ``"all"``.
        array_key: ``.npz`` only: which array to read.
        value_range: the range floating-point input lies in; it is mapped onto [-1, 1].

    Returns:
        an :class:`ImageDataset` serving float32 (C, H, W) images in [-1, 1].

    Raises:
        DataError: a missing path, no images, mixed sizes without ``image_size``, an unreadable file
            (named), or an array of the wrong rank, dtype or range.
    """
    _check_image_size_arg(image_size)
    _check_channels_arg(channels)
    if isinstance(source, ImageDataset):
        return _finish(source._storage, image_size=image_size, channels=channels, flip=flip or source.flip,
                       labels=source.labels, source=source.source)
    if isinstance(source, str) and source == "digits":
        images, labels = load_digits_images()
        return _finish(images, image_size=image_size, channels=channels, flip=flip, labels=labels,
                       source="sklearn digits (1,797 real 8x8 handwritten digits)")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"dataset path {path} does not exist; {_SOURCES_HINT}")
        if path.is_dir():
            cifar = _cifar_folder(path)
            if cifar is not None:
                return _load_cifar(cifar, split, image_size, channels, flip)
            return _load_image_folder(path, image_size, channels, flip)
        if path.suffix.lower() in (".npz", ".npy"):
            return _load_array_file(path, array_key, value_range, image_size, channels, flip)
        raise DataError(f"unsupported dataset file {path}: {_SOURCES_HINT}")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        x = _array_to_nchw(source.detach().cpu() if isinstance(source, torch.Tensor) else source,
                           "the given array" if isinstance(source, np.ndarray) else "the given tensor",
                           value_range, numpy_layout=isinstance(source, np.ndarray))
        return _finish(x, image_size=image_size, channels=channels, flip=flip,
                       source=f"in-memory {type(source).__name__}")
    if isinstance(source, torch.utils.data.Dataset) or hasattr(source, "__getitem__"):
        return _load_torch_dataset(source, value_range, image_size, channels, flip)
    raise DataError(f"cannot load a dataset from a {type(source).__name__}: {_SOURCES_HINT}, "
                    "an array/tensor of images, or a torch Dataset")


# --------------------------------------------------------------------------------------------------
# Writing images


def to_uint8_nhwc(x) -> np.ndarray:
    """Samples in [-1, 1] -> uint8 NHWC, as diffusers' DDPMPipeline does: round(clamp((x + 1) / 2, 0, 1) * 255).

    Args:
        x: float (N, C, H, W) torch.Tensor or np.ndarray (any device / float dtype).
    Returns:
        np.ndarray uint8 (N, H, W, C).
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4:
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"to_uint8_nhwc needs float (N, C, H, W) samples in [-1, 1], got {desc}")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise DataError("the samples contain NaN or infinite values (a diverged model or a bad checkpoint?); "
                        "check the model before saving images")
    y = ((x + 1.0) * 0.5).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


def _check_uint8_nhwc(images, name: str = "images") -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty uint8 (N, H, W, C) array with C = 1 or 3, got "
                        f"{images.dtype} {images.shape}; convert samples with to_uint8_nhwc(x)")
    return images


def _upscale(images: np.ndarray, scale: int) -> np.ndarray:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise DataError(f"scale must be a positive int, got {scale!r}")
    return images if scale == 1 else images.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest neighbour


def _write_png_atomic(array_hwc: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array_hwc[:, :, 0] if array_hwc.shape[-1] == 1 else array_hwc,
                          "L" if array_hwc.shape[-1] == 1 else "RGB")
    # a reader never sees a half-written file: write next to it, then rename over it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_grid(images_uint8_nhwc, path, nrow: int | None = None, scale: int = 1, padding: int = 2,
              pad_value: int = 0) -> Path:
    """Write N images as one PNG grid.

    Args:
        images_uint8_nhwc: uint8 (N, H, W, C) array or tensor, C = 1 or 3 (see :func:`to_uint8_nhwc`).
        path: the PNG to write (parent folders are created; written to a temp file, then renamed).
        nrow: images per row; None gives a near-square grid (ceil(sqrt(N))).
        scale: integer nearest-neighbour upscaling (8x8 digits are easier to see at scale 4 or 8).
        padding: pixels between and around the images (after scaling); pad_value: their gray level.

    Returns the path. The PNG is ``ncol * (W*scale + padding) + padding`` pixels wide and
    ``rows * (H*scale + padding) + padding`` high (ncol = min(nrow, N)), like torchvision's make_grid.
    """
    images = _upscale(_check_uint8_nhwc(images_uint8_nhwc), scale)
    n, h, w, c = images.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise DataError(f"nrow must be a positive int or None, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise DataError(f"padding must be an int >= 0, got {padding!r}")
    ncol, rows = min(nrow, n), math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[i]
    path = Path(path)
    _write_png_atomic(grid, path)
    return path


def save_pngs(images_uint8_nhwc, folder, names: Sequence[str] | None = None, scale: int = 1) -> list[Path]:
    """Write each image as its own PNG in ``folder`` (created if needed), each written atomically.

    Args:
        images_uint8_nhwc: uint8 (N, H, W, C) array or tensor, C = 1 or 3.
        folder: the output folder.
        names: N file stems (e.g. ``f"{seed:06d}"``); None gives 000000, 000001, ...
        scale: integer nearest-neighbour upscaling.

    Returns the written paths, in order.
    """
    images = _upscale(_check_uint8_nhwc(images_uint8_nhwc), scale)
    if names is None:
        names = [f"{i:06d}" for i in range(len(images))]
    names = [str(s) for s in names]
    if len(names) != len(images):
        raise DataError(f"got {len(names)} names for {len(images)} images; pass one name per image")
    if len(set(names)) != len(names):
        raise DataError("image names must be unique, got duplicates; pass distinct names")
    bad = [s for s in names if not s or "/" in s or "\\" in s or s in (".", "..")]
    if bad:
        raise DataError(f"bad image name {bad[0]!r}: names are file stems without path separators")
    folder = Path(folder)
    paths = [folder / f"{stem}.png" for stem in names]
    for img, p in zip(images, paths):
        _write_png_atomic(img, p)
    return paths
