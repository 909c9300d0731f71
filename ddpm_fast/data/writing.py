"""Writing images: float samples in [-1, 1] to uint8 NHWC, and uint8 NHWC images to PNG files (one grid, or
one file per image), each written to a temporary name and renamed into place."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import DataError

__all__ = ["to_uint8_nhwc", "save_grid", "save_pngs"]


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
