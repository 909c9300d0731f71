"""What ``ddpm-fast sample`` keeps in its output folder while it runs, so that a stopped run resumes with
the same bytes.

While sampling, ``DIR/unfinished/`` holds::

    samples.npy     uint8 (N, H, W, C), memory-mapped: row k is the image of the k-th seed once done
    progress.json   the settings that define the images, the chunks done, and one entry per session

The unit of work is the *chunk*: chunk k is seed positions ``[k*B, (k+1)*B)`` for the batch size B. It is
fixed by the seeds and B alone, so every image is sampled in the same batch in every run, at any world
size and across any number of resumes: bit-identical even where a kernel's result depends on the batch.
After each round rank 0 writes the round's rows into the spool, flushes it (msync), and only then
rewrites ``progress.json`` (temporary file, fsync, rename): the record never names a chunk whose rows
are not on disk, so a process killed at any moment, inside a flush too, leaves a folder that resumes
with at most the rounds in flight lost. A chunk redone after a kill writes the same bytes again.
When every chunk is done the folder's final files are written and ``unfinished/`` is removed: a folder
with ``run.json`` and without ``unfinished/`` is finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import read_json, write_json_atomic
from .errors import CheckpointError, DDPMFastError

__all__ = ["Progress", "FolderState", "inspect_folder", "chunk_positions", "check_same_settings",
           "check_room", "UNFINISHED", "PROGRESS_FORMAT", "SAMPLES_FORMAT"]

UNFINISHED = "unfinished"
PROGRESS_FILE = "progress.json"
SPOOL_FILE = "samples.npy"
PROGRESS_FORMAT = "ddpm-fast-sample-progress"
SAMPLES_FORMAT = "ddpm-fast-samples"  # run.json's "format"

# The settings that define the images, with the option that sets each (for the refusal's fix).
IMAGE_SETTINGS = {
    "weights": "--no-ema", "weights_sha256": "SOURCE (its weights)", "steps": "--steps", "solver": "--solver "
    "and its options", "variance": "--variance", "clip_x0": "--clip/--no-clip", "sampler": "--reference",
    "seeds": "--seeds", "image_shape": "the model's image size", "batch_size": "--batch-size",
    "device_type": "--device", "png_per_image": "--png-per-image",
}


class SampleFolderError(DDPMFastError, ValueError):
    """An output folder that cannot take (or resume) this run: one line naming the difference and the fix."""


def chunk_positions(num_images: int, batch_size: int, chunk: int) -> range:
    """The seed positions of chunk ``chunk``: ``[chunk*B, min((chunk+1)*B, N))``."""
    return range(chunk * batch_size, min((chunk + 1) * batch_size, num_images))


def _ranges(chunks) -> list[list[int]]:
    """[0, 1, 2, 5] -> [[0, 2], [5, 5]]: the done chunks, compactly."""
    out: list[list[int]] = []
    for c in sorted(chunks):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def _unranges(ranges) -> set[int]:
    return {c for lo, hi in ranges for c in range(int(lo), int(hi) + 1)}


@dataclass
class Progress:
    """The ``unfinished/`` record of one output folder (see the module docstring).

    settings: the image-defining settings (``IMAGE_SETTINGS`` keys plus source, model and the seed
    list as text). done: chunk indices whose rows are on disk. sessions: one dict per run of the
    command (start time, world size, seeds done, seconds, how it ended).
    """

    out_dir: Path
    settings: dict
    done: set[int] = field(default_factory=set)
    sessions: list[dict] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.out_dir / UNFINISHED

    @property
    def spool_path(self) -> Path:
        return self.folder / SPOOL_FILE

    @property
    def num_images(self) -> int:
        return int(self.settings["num_images"])

    @property
    def batch_size(self) -> int:
        return int(self.settings["batch_size"])

    @property
    def num_chunks(self) -> int:
        return -(-self.num_images // self.batch_size)

    def seeds_done(self, done=None) -> int:
        """Images done: the sizes of the done chunks."""
        return sum(len(chunk_positions(self.num_images, self.batch_size, c))
                   for c in (self.done if done is None else done))

    # -- files ----------------------------------------------------------------------------------

    @classmethod
    def start(cls, out_dir, settings: dict) -> "Progress":
        """Create ``unfinished/`` with a spool whose disk blocks are reserved now (a full disk fails here,
        with an OSError, instead of killing the process later when a memory-mapped page cannot be
        written), then the record."""
        progress = cls(Path(out_dir), dict(settings))
        shutil.rmtree(progress.folder, ignore_errors=True)  # a spool without a record: a start that died
        progress.folder.mkdir(parents=True)
        c, h, w = settings["image_shape"]
        array = np.lib.format.open_memmap(progress.spool_path, mode="w+", dtype=np.uint8,
                                          shape=(progress.num_images, h, w, c))
        header = array.offset
        del array
        if hasattr(os, "posix_fallocate"):
            with open(progress.spool_path, "rb+") as f:
                os.posix_fallocate(f.fileno(), 0, header + progress.num_images * h * w * c)
        progress.write()
        return progress

    @classmethod
    def load(cls, out_dir) -> "Progress | None":
        """The record of ``out_dir`` (None when it has none). Raises SampleFolderError when damaged."""
        out_dir = Path(out_dir)
        path = out_dir / UNFINISHED / PROGRESS_FILE
        if not path.is_file():
            return None
        try:
            data = read_json(path)
            if data.get("format") != PROGRESS_FORMAT:
                raise CheckpointError(f"{path} is not a ddpm-fast sampling record")
            progress = cls(out_dir, data["settings"], _unranges(data["done"]), list(data["sessions"]))
            bad = [c for c in progress.done if not 0 <= c < progress.num_chunks]
        except (CheckpointError, KeyError, TypeError, ValueError) as exc:
            raise SampleFolderError(f"{path} is damaged ({str(exc)[:120]}): delete {path.parent} to start over "
                                    "(its images are lost)") from None
        if bad or not progress.spool_path.is_file():
            raise SampleFolderError(f"{path.parent} is damaged (no spool or chunk {bad[:1]} out of range): delete "
                                    "it to start over")
        return progress

    def open_spool(self) -> np.ndarray:
        """The spool as a writable memory map, uint8 (N, H, W, C)."""
        return np.load(self.spool_path, mmap_mode="r+")

    def write(self) -> None:
        """Rewrite ``progress.json`` atomically (temporary file, fsync, rename)."""
        write_json_atomic(self.folder / PROGRESS_FILE, {
            "format": PROGRESS_FORMAT, "version": 1, "settings": self.settings, "done": _ranges(self.done),
            "seeds_done": self.seeds_done(), "num_images": self.num_images, "sessions": self.sessions})

    def remove(self) -> None:
        """Delete ``unfinished/`` (the run's final files are written)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- sessions -------------------------------------------------------------------------------

    def begin_session(self, entry: dict) -> dict:
        """Append this run of the command to ``sessions`` (a previous one that never ended was killed)."""
        for old in self.sessions:
            if old.get("ended") is None:
                old["ended"] = "killed or failed (no clean stop: the rounds in flight were lost)"
        entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ended": None,
                 "seeds_done_before": self.seeds_done(), **entry}
        self.sessions.append(entry)
        return entry


# --------------------------------------------------------------------------------------------------
# the folder before a run


@dataclass
class FolderState:
    """What an output folder holds: kind is "new" (absent or without our files), "unfinished",
    "finished" or "foreign" (another command's folder); ``what`` says which, for messages."""

    kind: str
    progress: Progress | None = None
    run: dict | None = None
    what: str = ""


def inspect_folder(out_dir, run_file: str) -> FolderState:
    """Classify ``out_dir`` for ``sample`` (see :class:`FolderState`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SampleFolderError(f"--out {out_dir} is a file: pass a folder")
    progress = Progress.load(out_dir)
    if progress is not None:
        return FolderState("unfinished", progress=progress)
    run_path = out_dir / run_file
    if run_path.is_file():
        try:
            run = read_json(run_path)
        except CheckpointError:
            run = {}
        if run.get("format") == SAMPLES_FORMAT:
            return FolderState("finished", run=run)
        return FolderState("foreign", what=f"its {run_file} was not written by this version of ddpm-fast sample")
    if (out_dir / "checkpoints").is_dir() or (out_dir / "log.jsonl").is_file():
        return FolderState("foreign", what="it is a training run folder (ddpm-fast train)")
    return FolderState("new")


def check_same_settings(recorded: dict, current: dict, out_dir) -> None:
    """Refuse (one line naming the first difference and the fix) a resume whose settings change the images."""
    for key, option in IMAGE_SETTINGS.items():
        if recorded.get(key) != current.get(key):
            was, now = recorded.get(key), current.get(key)
            if key == "weights_sha256":
                was, now = f"sha256 {str(was)[:12]}... ({recorded.get('weights_file')})", \
                    f"sha256 {str(now)[:12]}... ({current.get('weights_file')})"
            raise SampleFolderError(
                f"--resume: {key} differs from the run in {out_dir} ({was} there, {now} now): resume with the "
                f"settings it was started with ({option}; they are in {out_dir / UNFINISHED / PROGRESS_FILE}), "
                f"or sample into a new --out")


def check_room(out_dir, image_shape, num_images: int, png_per_image: bool, reserved: int = 0) -> None:
    """Refuse, before any sampling, a run the output folder's disk cannot hold: the spool and samples.npz
    each take N*H*W*C bytes (``reserved``: bytes already allocated by an unfinished run's spool).
    Also catches model configs whose images cannot exist at all (a sample_size of 10^9)."""
    c, h, w = (int(v) for v in image_shape)
    per_image = c * h * w
    need = 2 * num_images * per_image + (num_images * (per_image + 1024) if png_per_image else 0) - reserved
    probe = Path(out_dir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise SampleFolderError(
            f"{num_images:,} images of {h}x{w}x{c} need {need / 1e9:,.3g} GB in {out_dir} (spool and samples.npz) "
            f"but its disk has {free / 1e9:,.3g} GB free: free space, choose another --out or fewer --seeds"
            + ("; the model's image size looks wrong, check its config" if h * w > 2**28 else ""))


def check_writable(out_dir) -> None:
    """Refuse an output folder that cannot be written (one line, before any sampling)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SampleFolderError(f"cannot write to --out {out_dir} ({exc.strerror or exc}): choose a folder you "
                                "can write to") from None
