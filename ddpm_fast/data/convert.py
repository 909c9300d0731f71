"""Conversions shared by the in-memory loaders and the cache builder: array layouts and value ranges to
NCHW, channel counts, and resize-and-center-crop. Each works image by image, so converting a dataset in
chunks gives the same bytes as converting it whole."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

__all__ = ["resize_nchw", "convert_channels", "array_to_nchw", "check_channels_arg", "check_image_size_arg"]


def resize_nchw(x: torch.Tensor, size: int) -> torch.Tensor:
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


def convert_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
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


def check_channels_arg(channels) -> None:
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale), 3 (RGB) or None (keep the source's), got {channels!r}")


def check_image_size_arg(image_size) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive int (images are resized and center-cropped to "
                        f"image_size x image_size) or None, got {image_size!r}")


def array_to_nchw(arr, name: str, value_range: tuple[float, float], *, numpy_layout: bool) -> torch.Tensor:
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
