"""Decode once: convert a dataset source into a prepared folder (see :mod:`.prepared`), explicitly
(:func:`prepare_data`, ``ddpm-fast prepare-data``) or keyed by source and options in a shared cache folder
that every run on the machine finds (:func:`cached_dataset`, what ``train`` uses).

Safety:

- a folder is built under a temporary name next to its destination and renamed into place when complete
  (``meta.json`` written last), so an interrupted build is never used;
- one builder at a time per destination (an ``flock``; the torchrun ranks of one job wait for the first
  instead of decoding the same images N times);
- a cache records its source's fingerprint (every file's path, size and modification time): a changed
  source is rebuilt, not silently reused;
- the space is reserved up front (``posix_fallocate``), so a full disk is one line before any decoding,
  not a SIGBUS from a memory-mapped write.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import write_json_atomic
from ..errors import DataError
from .convert import array_to_nchw, check_channels_arg, check_image_size_arg, convert_channels, resize_nchw
from .dataset import ImageDataset
from .decode import decode_images, list_image_files
from .prepared import FORMAT, IMAGES_FILE, LABELS_FILE, META_FILE, VERSION, is_prepared, open_prepared, read_meta
from .sources import SOURCES_HINT, array_file_dtype, find_cifar_folder, read_array_file, read_cifar

__all__ = ["prepare_data", "cached_dataset", "default_cache_root", "cache_path_for", "source_fingerprint",
           "FloatSourceError", "CACHE_ENV"]

CACHE_ENV = "DDPM_FAST_DATA_CACHE"
_CHUNK_BYTES = 64 << 20  # array sources are converted and hashed this many bytes at a time


class FloatSourceError(DataError):
    """The source holds floating-point images: a uint8 cache would change them, so they stay in memory."""


def default_cache_root() -> Path:
    """$DDPM_FAST_DATA_CACHE, else $XDG_CACHE_HOME/ddpm-fast/data, else ~/.cache/ddpm-fast/data."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpm-fast" / "data"


def _options(image_size, channels, split, array_key) -> dict:
    return {"image_size": image_size, "channels": channels, "split": split, "array_key": array_key}


def _source_path(source) -> Path:
    if not isinstance(source, (str, os.PathLike)) or str(source) == "digits":
        raise DataError(f"prepare-data reads files: {SOURCES_HINT} (not 'digits' or an in-memory object)")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist; {SOURCES_HINT}")
    return path.resolve()


def cache_path_for(source, *, image_size=None, channels=None, split="train", array_key=None,
                   cache_root=None) -> Path:
    """The cache folder of (source, options) under ``cache_root`` (default :func:`default_cache_root`)."""
    path = _source_path(source)
    key = json.dumps({"source": str(path), **_options(image_size, channels, split, array_key), "version": VERSION},
                     sort_keys=True)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name)[:40] or "data"
    root = Path(cache_root).expanduser() if cache_root else default_cache_root()
    return root / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def source_fingerprint(path: Path) -> str:
    """sha256 of (relative path, size, mtime) of every file the source holds: changes when any file does.
    One ``stat`` per file (``os.scandir`` gives the file type for free): ~20k files in well under a second."""
    path = Path(path)
    if not path.is_dir():
        st = path.stat()
        return hashlib.sha256(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()).hexdigest()
    entries = []

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir(follow_symlinks=True):
                    walk(e.path, prefix + e.name + "/")
                elif e.is_file(follow_symlinks=True):
                    st = e.stat()
                    entries.append(f"{prefix}{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n")

    walk(str(path), "")
    return hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# writing


def _full_disk(where: Path, needed: int | None = None) -> DataError:
    free = shutil.disk_usage(where).free if where.exists() else None
    need = f" (needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free)" if needed is not None and free is not None else ""
    return DataError(f"no space left on the disk holding {where} for the prepared data{need}: free space, or "
                     f"put the cache elsewhere (--data-cache DIR, ${CACHE_ENV}, or prepare-data --out DIR)")


def _allocate(images_path: Path, shape) -> Path:
    """Create images.npy for uint8 ``shape`` with every block reserved on disk."""
    nbytes = int(np.prod(shape))
    if shutil.disk_usage(images_path.parent).free < nbytes + (1 << 20):
        raise _full_disk(images_path.parent, nbytes)
    arr = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=tuple(shape))
    offset = arr.offset
    del arr
    if not hasattr(os, "posix_fallocate"):  # macOS: no reservation, the free-space check above stands alone
        return images_path
    fd = os.open(images_path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, offset + nbytes)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _full_disk(images_path.parent, nbytes) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: write as we go
            raise
    finally:
        os.close(fd)
    return images_path


def _write_array_source(x_source, name: str, out: Path, image_size, channels, labels=None):
    """uint8 images (a NumPy NHWC array, possibly memory-mapped, or a torch NCHW tensor) converted chunk by
    chunk into out/images.npy (prepare_data refused other dtypes from the file's header). Returns (labels,
    shape)."""
    is_tensor = isinstance(x_source, torch.Tensor)
    if not is_tensor:
        first = array_to_nchw(np.array(x_source[:1]), name, (-1.0, 1.0), numpy_layout=True)
    else:
        first = x_source[:1]
    first = convert_channels(first, channels)
    if image_size is not None:
        first = resize_nchw(first, image_size)
    n = x_source.shape[0]
    _, c, h, w = first.shape
    shape = (n, h, w, c)
    images = np.lib.format.open_memmap(_allocate(out / IMAGES_FILE, shape), mode="r+")
    per_image = max(1, int(np.prod(x_source.shape[1:])))
    step = max(1, _CHUNK_BYTES // per_image)
    for lo in range(0, n, step):
        part = x_source[lo:lo + step]
        x = part if is_tensor else array_to_nchw(np.array(part), name, (-1.0, 1.0), numpy_layout=True)
        x = convert_channels(x, channels)
        if image_size is not None:
            x = resize_nchw(x, image_size)
        images[lo:lo + x.shape[0]] = x.permute(0, 2, 3, 1).numpy()
    images.flush()
    del images
    return labels, shape


def _content_hash(out: Path, labels: np.ndarray | None) -> str:
    h = hashlib.sha256()
    with open(out / IMAGES_FILE, "rb") as f:
        f.seek(np.load(out / IMAGES_FILE, mmap_mode="r").offset)
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _build(path: Path, out: Path, options: dict, fingerprint: str, workers, progress) -> None:
    """Write the prepared folder for ``path`` into ``out`` (an empty folder)."""
    image_size, channels = options["image_size"], options["channels"]
    class_names: list[str] = []
    labels_from = None
    if path.is_dir() and find_cifar_folder(path) is None or path.suffix.lower() == ".zip":
        files = list_image_files(path, SOURCES_HINT)
        _, shape = decode_images(files, image_size=image_size, channels=channels, workers=workers,
                                 progress=progress, out_file=str(out / IMAGES_FILE),
                                 allocate=lambda s: _allocate(out / IMAGES_FILE, s))
        labels, labels_from, class_names = files.labels, files.label_source, files.class_names
        kind, source = ("zip" if files.is_zip else "image folder"), files.describe()
    elif path.is_dir():
        x, labels_t, source = read_cifar(find_cifar_folder(path), options["split"])
        labels, shape = _write_array_source(x, source, out, image_size, channels, labels_t.numpy())
        kind, labels_from = "cifar10", "CIFAR-10 batches"
    elif path.suffix.lower() in (".npy", ".npz"):
        arr, name = read_array_file(path, options["array_key"], mmap=True)
        labels, shape = _write_array_source(arr, name, out, image_size, channels)
        kind, source = "array file", str(path)
    else:
        raise DataError(f"unsupported dataset file {path}: {SOURCES_HINT}")
    if labels is not None:
        np.save(out / LABELS_FILE, np.ascontiguousarray(labels, dtype=np.int64))
    n, h, w, c = shape
    meta = {"format": FORMAT, "version": VERSION, "source": source, "source_path": str(path), "source_kind": kind,
            "source_fingerprint": fingerprint, "options": options,
            "resize": None if image_size is None else "shorter side to image_size (bicubic), center crop",
            "num_images": n, "height": h, "width": w, "channels_stored": c,
            "labels": None if labels is None else {"count": int(len(labels)), "from": labels_from,
                                                   "class_names": class_names,
                                                   "num_classes": int(labels.max()) + 1 if len(labels) else 0},
            "sha256": _content_hash(out, labels), "created": time.time()}
    for name in (IMAGES_FILE, LABELS_FILE):  # the data on disk before meta.json says it is there
        if (out / name).exists():
            fd = os.open(out / name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    write_json_atomic(out / META_FILE, meta)


@contextmanager
def _locked(dest: Path):
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def _is_current(dest: Path, options: dict, fingerprint: str) -> bool:
    if not is_prepared(dest):
        return False
    try:
        meta = read_meta(dest)
    except DataError:
        return False
    return meta.get("options") == options and meta.get("source_fingerprint") == fingerprint


def prepare_data(source, out=None, *, image_size: int | None = None, channels: int | None = None,
                 split: str = "train", array_key: str | None = None, workers: int | None = None,
                 progress: bool = True, cache_root=None) -> Path:
    """Decode ``source`` once into a prepared folder (uint8 NHWC ``images.npy``, ``labels.npy``, ``meta.json``).

    Args:
        source: a path: an image folder, a ``.zip`` of images (EDM's ``dataset_tool.py`` format), a CIFAR-10
            batch folder, or a uint8 ``.npy``/``.npz``.
        out: the folder to write; None: the cache folder of (source, options) under ``cache_root``.
        image_size / channels / split / array_key: as for :func:`~ddpm_fast.data.load_dataset`.
        workers: decoding processes (None: one per CPU, up to 16). progress: tqdm bars.

    Returns the folder. An up-to-date folder (same options, unchanged source) is kept as it is; a stale
    one is rebuilt and replaced in one rename.

    Raises:
        DataError: a bad source or file (named), float images (:class:`FloatSourceError`), a full disk,
            or ``out`` naming a folder that is not prepared data.
    """
    check_image_size_arg(image_size)
    check_channels_arg(channels)
    path = _source_path(source)
    if is_prepared(path):
        raise DataError(f"{path} is already prepared data: pass it to train --data directly")
    options = _options(image_size, channels, split, array_key)
    dest = (cache_path_for(path, cache_root=cache_root, **options) if out is None
            else Path(out).expanduser().resolve())
    if dest.exists() and not is_prepared(dest) and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest} exists and is not a prepared-data folder: choose another --out")
    if path.is_file() and path.suffix.lower() in (".npy", ".npz"):
        # float images are refused from the header, before the lock, the temp folder or reading the data
        dtype, name = array_file_dtype(path, options["array_key"])
        if dtype != np.uint8:
            raise FloatSourceError(f"{name} holds {dtype} images: prepared data is uint8, so it stays in memory "
                                   "(pass it to train directly; prepare-data takes 8-bit sources)")
    # the fingerprint walk (one stat per source file) and the check run before the lock: the ranks of a job
    # that find the cache current then start side by side instead of queueing behind each other's walks
    fingerprint = source_fingerprint(path)
    if _is_current(dest, options, fingerprint):
        return dest
    try:
        with _locked(dest):
            if _is_current(dest, options, fingerprint):  # another process built it while we waited
                return dest
            if is_prepared(dest):
                print(f"ddpm-fast: {path} or the options changed since {dest} was prepared: preparing it again",
                      file=sys.stderr)
            for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by a builder that died (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
            tmp.mkdir()
            try:
                _build(path, tmp, options, fingerprint, workers, progress)
                if dest.exists():  # out of the way in one rename; readers holding its files keep them
                    old = dest.parent / f".{dest.name}.tmp-old-{os.getpid()}"
                    os.rename(dest, old)
                    os.rename(tmp, dest)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _full_disk(dest.parent) from None
        raise
    return dest


def cached_dataset(source, *, image_size: int | None = None, channels: int | None = None, flip: bool = False,
                   split: str = "train", array_key: str | None = None, cache_root=None, workers: int | None = None,
                   progress: bool = True, in_memory: bool = False) -> ImageDataset:
    """The dataset of ``source`` through the cache: a prepared folder is opened as it is; a raw file source is
    prepared into the cache (or found there, up to date) and memory-mapped (``in_memory``: read into RAM).

    Raises :class:`FloatSourceError` for float arrays (the caller loads those in memory).
    """
    path = Path(source).expanduser() if isinstance(source, (str, os.PathLike)) else None
    if path is not None and is_prepared(path):
        dest = path
    else:
        dest = prepare_data(source, image_size=image_size, channels=channels, split=split, array_key=array_key,
                            workers=workers, progress=progress, cache_root=cache_root)
    dataset = open_prepared(dest, flip=flip, in_memory=in_memory)
    if dest == path and ((image_size is not None and image_size != dataset.image_size)
                         or (channels is not None and channels != dataset.channels)):
        raise DataError(f"{dest} was prepared at {dataset.shape[1]}x{dataset.shape[2]} with {dataset.channels} "
                        "channels: prepare it again with the --image-size/--channels you want, or drop them")
    return dataset
