"""The dataset object: N images in one (N, H, W, C) array, in memory or memory-mapped from a prepared cache,
served as float32 NCHW batches in [-1, 1].

Storage is NHWC because that is how images are decoded and how a prepared cache lies on disk (one image is
one contiguous run of bytes, so a batch gather touches B runs); the float conversion produces NCHW.
8-bit sources stay uint8 (a quarter of the bytes) and are converted per batch: ``v / 127.5 - 1`` maps
0 -> -1 and 255 -> 1, the same float32 arithmetic whichever path (memory or cache, CPU or CUDA) feeds it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import DataError

__all__ = ["ImageDataset", "to_float_nchw", "flip_rows_"]


def flip_rows_(pixels: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror left-right, in place, the images of a host (B, H, W, C) batch whose bool ``flips`` is True.

    Only the flipped rows are copied (an ``index_copy_``; ``torch.where`` would write every row twice):
    about half the cost. Reading the mask's indices (``nonzero``) is free on the host; a device batch
    uses :func:`to_float_nchw`'s ``flips`` instead, which never waits for the device."""
    rows = flips.nonzero().squeeze(1)
    if rows.numel():
        pixels.index_copy_(0, rows, pixels.index_select(0, rows).flip(2))
    return pixels


def to_float_nchw(pixels: torch.Tensor, flips: torch.Tensor | None = None, *,
                  channels_last: bool = False) -> torch.Tensor:
    """Stored pixels -> the float32 (B, C, H, W) batch a model trains on, in [-1, 1].

    Args:
        pixels: (B, H, W, C) uint8 (0..255) or float32 (already in [-1, 1]), on any device.
        flips: optional bool (B,) on the same device: True mirrors that image left-right. A ``torch.where``,
            not a masked assignment, so a CUDA batch is flipped without a host wait.
        channels_last: return NCHW-shaped data with channels-last strides (no copy of the layout; the
            CUDA training path wants it); otherwise contiguous NCHW.
    """
    if flips is not None:
        pixels = torch.where(flips.view(-1, 1, 1, 1), pixels.flip(2), pixels)
    nchw = pixels.permute(0, 3, 1, 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(nchw.shape, dtype=torch.float32, device=pixels.device, memory_format=fmt)
    out.copy_(nchw)
    if pixels.dtype == torch.uint8:
        out.div_(127.5).sub_(1.0)
    return out


class ImageDataset(torch.utils.data.Dataset):
    """N images, stored as one (N, H, W, C) tensor; items and batches come out float32 NCHW in [-1, 1].

    Args:
        images: (N, C, H, W) tensor, either uint8 (pixel values 0..255) or float32 already in [-1, 1].
        labels: optional int64 (N,) class labels (digits, CIFAR-10, class folders, EDM zips); nothing
            trains on them yet.
        flip: whether a :class:`~ddpm_fast.data.BatchStream` over this dataset applies random horizontal flips.
        source: a short description of where the images came from, for :meth:`describe`.

    Use :func:`~ddpm_fast.data.load_dataset` to build one from a file, folder or array, or
    :func:`~ddpm_fast.data.open_prepared` to memory-map a prepared cache.
    """

    def __init__(self, images: torch.Tensor, *, labels: torch.Tensor | None = None, flip: bool = False,
                 source: str = "tensor"):
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise DataError("ImageDataset needs a 4-D (N, C, H, W) tensor; build one with load_dataset(...)")
        self._init(images.permute(0, 2, 3, 1).contiguous(), labels=labels, flip=flip, source=source, mapped=None)

    @classmethod
    def from_nhwc(cls, pixels: torch.Tensor, *, labels=None, flip: bool = False, source: str = "tensor",
                  mapped: str | None = None) -> "ImageDataset":
        """A dataset over (N, H, W, C) uint8/float32 pixels as given (no copy: a memory-mapped tensor stays
        mapped). ``mapped``: the file the pixels are mapped from, if any (shown by :meth:`describe`)."""
        ds = cls.__new__(cls)
        ds._init(pixels, labels=labels, flip=flip, source=source, mapped=mapped)
        return ds

    def _init(self, pixels: torch.Tensor, *, labels, flip, source, mapped) -> None:
        if pixels.dtype not in (torch.uint8, torch.float32):
            raise DataError(f"ImageDataset stores uint8 or float32 images, got {pixels.dtype}; "
                            "build one with load_dataset(...)")
        if pixels.shape[0] == 0:
            raise DataError(f"no images in {source}: the dataset is empty")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.int64)
            if labels.ndim != 1 or labels.shape[0] != pixels.shape[0]:
                raise DataError(f"labels must have shape ({pixels.shape[0]},), got {tuple(labels.shape)}")
        self.pixels = pixels  # (N, H, W, C), as stored
        self.labels = labels
        self.flip = bool(flip)
        self.source = source
        self.mapped = mapped

    # shape ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def num_images(self) -> int:
        return self.pixels.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, h, w, c = self.pixels.shape
        return (c, h, w)

    @property
    def channels(self) -> int:
        return self.pixels.shape[3]

    @property
    def image_size(self) -> int | tuple[int, int]:
        """H when the images are square (the usual case), else (H, W)."""
        h, w = self.pixels.shape[1:3]
        return h if h == w else (h, w)

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def storage_dtype(self) -> torch.dtype:
        """uint8 for 8-bit sources (converted per batch), float32 otherwise."""
        return self.pixels.dtype

    # data -----------------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> torch.Tensor:
        """One image, float32 (C, H, W) in [-1, 1], never flipped."""
        return to_float_nchw(self.pixels[index].unsqueeze(0))[0]

    def gather_pixels(self, indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The stored (B, H, W, C) pixels at int64 ``indices`` (on the dataset's device), into ``out`` if given."""
        if out is None:
            return self.pixels.index_select(0, indices)
        return torch.index_select(self.pixels, 0, indices, out=out)

    def gather(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as a float32 (B, C, H, W) tensor in [-1, 1] on the dataset's device."""
        idx = torch.as_tensor(indices, dtype=torch.int64).to(self.pixels.device)
        return to_float_nchw(self.gather_pixels(idx))

    @property
    def images(self) -> torch.Tensor:
        """All images as one float32 (N, C, H, W) tensor in [-1, 1] (a fresh copy)."""
        return to_float_nchw(self.pixels)

    def nchw(self) -> torch.Tensor:
        """The stored images as an (N, C, H, W) view in their stored dtype (uint8 or float32)."""
        return self.pixels.permute(0, 3, 1, 2)

    def to(self, device: torch.device | str) -> "ImageDataset":
        """The same dataset with its images stored on ``device`` (batches are then gathered there)."""
        labels = None if self.labels is None else self.labels.to(device)
        return ImageDataset.from_nhwc(self.pixels.to(device), labels=labels, flip=self.flip, source=self.source)

    def describe(self) -> str:
        """One line: count, image shape, storage and source."""
        c, h, w = self.shape
        kind = "uint8 0..255" if self.storage_dtype == torch.uint8 else "float32"
        where = f"memory-mapped from {self.mapped}" if self.mapped else f"on {self.device}"
        return (f"{self.num_images} images of {c}x{h}x{w} (CxHxW) from {self.source}; stored {kind} {where}, "
                f"served float32 in [-1, 1]; random horizontal flip {'on' if self.flip else 'off'}")

    def __repr__(self) -> str:
        c, h, w = self.shape
        return (f"ImageDataset(num_images={self.num_images}, shape=({c}, {h}, {w}), "
                f"source={self.source!r}, flip={self.flip})")
