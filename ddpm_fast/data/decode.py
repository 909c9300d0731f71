"""Decoding image files (a folder, or a zip such as EDM's ``dataset_tool.py`` writes) into one uint8 NHWC
array, in parallel processes with a progress bar.

Two passes: the headers (mode and size, no pixel decoding) settle the channel count and check that the
sizes agree; then every image is decoded, converted and, with ``image_size``, resized and center-cropped
straight into its row of the output. Both passes run in worker processes, a chunk of files per task; the
decode pass writes into the memory-mapped output file, so no pixels travel between processes.

Labels: EDM's ``dataset.json`` (``{"labels": [["00000/img00000000.png", 6], ...]}``, or ``null``) in the
zip or folder; else, in a folder (not a zip: EDM's ``00000/`` subfolders are chunks), class folders: every
image inside a first-level subfolder, label = the subfolder's index in sorted order (torchvision's
ImageFolder numbering).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import zipfile
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "list_image_files", "decode_images", "default_workers"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}
_CHUNK = 128  # files per worker task: large enough to amortize a task, small enough for a smooth bar
_SERIAL_BELOW = 256  # fewer files than this decode in this process (starting workers costs more)


@dataclass
class ImageFiles:
    """The images of a folder or zip, in sorted name order, with labels where the source has them."""

    root: Path
    is_zip: bool
    names: list[str]
    labels: np.ndarray | None = None  # int64 (N,)
    label_source: str | None = None  # "dataset.json" or "class folders"
    class_names: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{'zip' if self.is_zip else 'image folder'} {self.root}"


def default_workers() -> int:
    """Worker processes for decoding: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def _edm_labels(text: str, where: str, names: list[str]):
    try:
        labels = json.loads(text).get("labels")
    except (ValueError, AttributeError) as exc:
        raise DataError(f"cannot read dataset.json in {where}: {exc}; fix or remove it") from None
    if labels is None:
        return None
    try:
        table = {str(name): int(label) for name, label in labels}
    except (TypeError, ValueError):
        raise DataError(f"dataset.json in {where} must hold labels as [[file name, int], ...] "
                        "(EDM's dataset_tool format); fix or remove it") from None
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f"dataset.json in {where} has no label for {missing[0]} ({len(missing)} images "
                        "unlabelled); fix or remove it")
    return np.array([table[n] for n in names], dtype=np.int64)


def _class_folder_labels(names: list[str]):
    parts = [n.split("/") for n in names]
    if len(parts) < 2 or any(len(p) < 2 for p in parts):
        return None, []
    classes = sorted({p[0] for p in parts})
    if len(classes) < 2:
        return None, []
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64), classes


def list_image_files(path: Path, sources_hint: str = "") -> ImageFiles:
    """The images under a folder (recursively) or in a ``.zip``, sorted by their '/'-separated names."""
    if path.is_dir():
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        meta_path = path / "dataset.json"
        meta_text = meta_path.read_text(encoding="utf-8") if meta_path.is_file() else None
        is_zip = False
    else:
        try:
            with zipfile.ZipFile(path) as z:
                members = z.namelist()
                names = sorted(n for n in members if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
                meta_text = z.read("dataset.json").decode("utf-8") if "dataset.json" in members else None
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"cannot read zip file {path}: {exc}; re-create it (e.g. with EDM's dataset_tool.py)") from None
        is_zip = True
    if not names:
        raise DataError(f"no images found in {path} (searched {'the zip' if is_zip else 'recursively'} for "
                        f"{', '.join(IMAGE_EXTENSIONS)}); {sources_hint}")
    files = ImageFiles(path, is_zip, names)
    if meta_text is not None:
        files.labels = _edm_labels(meta_text, str(path), names)
        files.label_source = "dataset.json" if files.labels is not None else None
    if meta_text is None and not is_zip:  # EDM's subfolders (00000/, 00001/) are chunks, not classes
        files.labels, files.class_names = _class_folder_labels(names)
        files.label_source = "class folders" if files.labels is not None else None
    return files


# --------------------------------------------------------------------------------------------------
# one image


class _Opener:
    """Opens images of one folder or zip by name (a zip is opened once per worker task)."""

    def __init__(self, root: Path, is_zip: bool):
        self.root, self.is_zip = root, is_zip
        self.zip = zipfile.ZipFile(root) if is_zip else None

    def open(self, name: str, *, decode: bool):
        from PIL import Image, UnidentifiedImageError

        where = f"{name} in {self.root}" if self.is_zip else str(self.root / name)
        try:
            src = io.BytesIO(self.zip.read(name)) if self.is_zip else self.root / name
            img = Image.open(src)
            if decode:
                img.load()  # decode now, so a truncated file fails here with its name
            return img
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read image file {where}: {exc}; remove or replace it") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def pil_to_uint8_hwc(img, mode: str, image_size: int | None):
    """One PIL image -> uint8 (H, W, C) in ``mode`` ("L" or "RGB"), resized (bicubic) and center-cropped to
    image_size x image_size when given."""
    from PIL import Image, ImageOps

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F") and mode == "L":
        # 16-bit and float grayscale: Pillow's convert("L") clips instead of scaling
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I") and a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")
    img = img.convert(mode)
    if image_size is not None and img.size != (image_size, image_size):
        img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BICUBIC)
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def _headers(root: Path, is_zip: bool, names: list[str]) -> list[tuple[str, tuple[int, int]]]:
    opener = _Opener(root, is_zip)
    try:
        out = []
        for name in names:
            with opener.open(name, decode=False) as img:
                out.append((img.mode, img.size))
        return out
    finally:
        opener.close()


def _decode_chunk(root: Path, is_zip: bool, names: list[str], start: int, mode: str, image_size,
                  out_file: str | None, shape) -> np.ndarray | int:
    """Decode names into rows start.. of the .npy at out_file (returns the count), or return the rows."""
    opener = _Opener(root, is_zip)
    try:
        rows = np.empty((len(names), *shape[1:]), np.uint8) if out_file is None else None
        target = rows
        if out_file is not None:
            target = np.lib.format.open_memmap(out_file, mode="r+")[start:start + len(names)]
        for i, name in enumerate(names):
            with opener.open(name, decode=True) as img:
                target[i] = pil_to_uint8_hwc(img, mode, image_size)
        if out_file is not None:
            target.flush()
            return len(names)
        return rows
    finally:
        opener.close()


# --------------------------------------------------------------------------------------------------
# many images


def _run(tasks, pool, bar_total: int, progress: bool, desc: str) -> list:
    """Run (fn, args, size) tasks, here (pool None) or in the worker pool; results in submission order.
    The first error cancels the tasks not yet started and is raised."""
    from tqdm.auto import tqdm

    bar = tqdm(total=bar_total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if pool is None:
            results = []
            for fn, args, size in tasks:
                results.append(fn(*args))
                bar.update(size)
            return results
        futures = [pool.submit(fn, *args) for fn, args, _ in tasks]
        sizes = {f: size for f, (_, _, size) in zip(futures, tasks)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        raise f.exception()
                    bar.update(sizes[f])
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        return [f.result() for f in futures]
    finally:
        bar.close()


@contextmanager
def _pool(workers: int):
    if workers <= 1:
        yield None
        return
    # fork: the workers touch only Pillow and NumPy, and start in milliseconds
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield pool


def decode_images(files: ImageFiles, *, image_size: int | None, channels: int | None,
                  out_file: str | None = None, workers: int | None = None, progress: bool = False,
                  allocate=None) -> tuple[np.ndarray | None, tuple[int, int, int, int]]:
    """Decode every image of ``files`` into uint8 (N, H, W, C).

    Args:
        image_size: resize the shorter side to this (bicubic) and center-crop square; None: the images
            must all have one size.
        channels: 1 or 3; None: RGB unless every image is grayscale.
        out_file: write into this ``.npy`` (created by ``allocate(shape)``, which must return its path)
            instead of returning the array.
        workers: processes (None: :func:`default_workers`; small sets decode in this process).
        progress: show tqdm bars.

    Returns (array or None, shape).
    """
    names, n = files.names, len(files.names)
    workers = default_workers() if workers is None else max(1, int(workers))
    if n < _SERIAL_BELOW:
        workers = 1
    chunks = [(i, names[i:i + _CHUNK]) for i in range(0, n, _CHUNK)]
    with _pool(workers) as pool:
        if channels is None or image_size is None:
            tasks = [(_headers, (files.root, files.is_zip, chunk), len(chunk)) for _, chunk in chunks]
            heads = [h for part in _run(tasks, pool, n, progress, "read headers") for h in part]
            if channels is None:
                channels = 1 if all(m in _GRAYSCALE_MODES for m, _ in heads) else 3
            if image_size is None:
                first = heads[0][1]
                other = next((i for i, (_, s) in enumerate(heads) if s != first), None)
                if other is not None:
                    raise DataError(
                        f"images in {files.root} have different sizes ({names[0]} is {first[0]}x{first[1]}, "
                        f"{names[other]} is {heads[other][1][0]}x{heads[other][1][1]}): pass an image size "
                        "(image_size=N, --image-size N) to resize and center-crop them")
                w, h = first
            else:
                h = w = image_size
        else:
            h = w = image_size
        shape = (n, h, w, channels)
        mode = "L" if channels == 1 else "RGB"
        if out_file is not None:
            out_file = str(allocate(shape))
        tasks = [(_decode_chunk, (files.root, files.is_zip, chunk, start, mode, image_size, out_file, shape),
                  len(chunk)) for start, chunk in chunks]
        parts = _run(tasks, pool, n, progress, "decode")
    if out_file is not None:
        return None, shape
    return np.concatenate(parts) if len(parts) > 1 else parts[0], shape
