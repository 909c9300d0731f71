"""Seeded, resumable batches, assembled ahead of the training step.

The order is a pure function of (seed, number of batches drawn): each epoch is a ``torch.randperm`` of the
dataset from a generator seeded by (seed, epoch), followed by one flip coin per image from the same
generator; batch k of the epoch is positions k*B .. (k+1)*B - 1 of that permutation. Under torchrun rank r
of N takes positions k*B + r*B/N .. k*B + (r+1)*B/N - 1 and reads only those images.

Where the work happens (all three give the same values, bit for bit):

- dataset on the CPU, batches for the CPU: a background thread gathers, flips and converts the next
  batches while the current step runs (``prefetch``; torch's kernels release the GIL).
- dataset on the CPU, batches for CUDA ("staged"): the thread gathers and flips the stored uint8 pixels
  into a ring of pinned host buffers; the training thread uploads one with ``non_blocking=True`` (a
  quarter of the bytes of float32) and converts on the device. A buffer is refilled only after the CUDA
  event recorded behind its upload has completed, polled by the background thread, so the training thread
  never waits for the host.
- dataset already on the device (``ImageDataset.to("cuda")``): each epoch's permutation and flips are
  computed on the CPU and uploaded once through ``checks.host_to_device`` (pinned, non-blocking); a
  batch is then device-side slicing and ``index_select``: no host wait per step.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from typing import Iterator

import numpy as np
import torch

from ..checks import host_to_device
from ..errors import DataError
from .dataset import ImageDataset, flip_rows_, to_float_nchw

__all__ = ["BatchStream", "epoch_plan", "PREFETCH_DEPTH"]

PREFETCH_DEPTH = 3  # batches assembled ahead: enough to ride out one slow gather (a page fault burst)


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) into independent streams: no collisions between nearby pairs.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


def epoch_plan(num_images: int, seed: int, epoch: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The epoch's order and flips: int64 (N,) permutation and bool (N,) coins (None without flips), on the CPU."""
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    order = torch.randperm(num_images, generator=g)
    flips = torch.rand(num_images, generator=g) < 0.5 if flip else None
    return order, flips


class _Plans:
    """The last two epochs' plans on one device (a reader ahead of the trainer straddles an epoch boundary)."""

    def __init__(self, num_images: int, seed: int, flip: bool, device: torch.device | None):
        self.num_images, self.seed, self.flip, self.device = num_images, seed, flip, device
        self._cache: dict[int, tuple] = {}

    def get(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        plan = self._cache.get(epoch)
        if plan is None:
            order, flips = epoch_plan(self.num_images, self.seed, epoch, self.flip)
            if self.device is not None and self.device.type != "cpu":
                # once per epoch, pinned and non-blocking: per-step slicing then stays on the device
                order = host_to_device(order, self.device)
                flips = None if flips is None else host_to_device(flips, self.device)
            plan = (order, flips)
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = plan
        return plan


class _Slicer:
    """Batch number -> (indices, flips) of this rank's share, from the epoch plans."""

    def __init__(self, plans: _Plans, batches_per_epoch: int, batch_size: int, rank: int, world_size: int):
        self.plans, self.bpe = plans, batches_per_epoch
        self.share = batch_size // world_size
        self.offset = rank * self.share
        self.batch_size = batch_size

    def __call__(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        epoch, position = divmod(n, self.bpe)
        order, flips = self.plans.get(epoch)
        lo = position * self.batch_size + self.offset
        return order[lo:lo + self.share], None if flips is None else flips[lo:lo + self.share]


class _Prefetcher:
    """A daemon thread that makes batches ``start, start+1, ...`` with ``make(n)`` into a bounded queue.

    Holds no reference to the stream, so a dropped stream is collected and its finalizer stops the thread.
    ``make(n)`` may take a free buffer from ``free`` (the staged path); exceptions travel to the consumer.
    """

    def __init__(self, make, start: int, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(make, start), daemon=True,
                                       name="ddpm-fast-batches")
        self.thread.start()

    def _run(self, make, n: int) -> None:
        while not self.stop.is_set():
            try:
                item = (n, make(n, self.stop), None)
            except _Stopped:
                return
            except BaseException as exc:  # delivered to the consumer, which raises it
                item = (n, None, exc)
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            n += 1

    def take(self, n: int):
        got, value, exc = self.queue.get()
        if exc is not None:
            raise exc
        assert got == n, (got, n)  # one consumer, in order
        return value

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


class _Stopped(Exception):
    pass


class _StagingRing:
    """Host buffers for the staged path: (B, H, W, C) in the storage dtype, pinned when headed for CUDA.

    A buffer is free again once the copy out of it has completed: on CUDA the event recorded after the
    upload is polled (``query``, never a blocking synchronize), on the CPU the copy is already done."""

    def __init__(self, count: int, shape, dtype, pin: bool):
        self.buffers = [torch.empty(shape, dtype=dtype, pin_memory=pin) for _ in range(count)]
        self.free: queue.Queue = queue.Queue()
        for i in range(count):
            self.free.put((i, None))

    def acquire(self, stop: threading.Event) -> int:
        while True:
            try:
                i, event = self.free.get(timeout=0.1)
                break
            except queue.Empty:
                if stop.is_set():
                    raise _Stopped from None
        while event is not None and not event.query():
            if stop.is_set():
                raise _Stopped
            time.sleep(5e-5)
        return i

    def release(self, i: int, event) -> None:
        self.free.put((i, event))


def _assemble(dataset: ImageDataset, slicer: _Slicer, n: int, channels_last: bool) -> torch.Tensor:
    """Batch n, float NCHW where the dataset lives: flipped on the host in place, on a device by torch.where."""
    idx, flips = slicer(n)
    pixels = dataset.gather_pixels(idx)
    if flips is not None and pixels.device.type == "cpu":
        pixels, flips = flip_rows_(pixels, flips), None
    return to_float_nchw(pixels, flips, channels_last=channels_last)


class BatchStream:
    """An endless stream of random batches, a pure function of (seed, number of batches drawn).

    Each epoch visits a fresh random permutation of the dataset in ``len(dataset) // batch_size`` full
    batches (the remainder of a permutation is skipped; it is covered by other epochs). The permutation
    and, with ``flip``, one coin per image come from a torch generator seeded by (seed, epoch), so
    :meth:`state_dict` is a handful of ints and a resumed run draws exactly the batches an
    uninterrupted run would have drawn.

    Args:
        dataset: an :class:`ImageDataset` (anything else goes through :func:`load_dataset`).
        batch_size: images per (global) batch; must not exceed the number of images.
        seed: any int >= 0.
        flip: random horizontal flips; None takes ``dataset.flip``.
        device: where batches are delivered; None keeps the dataset's device.
        rank / world_size: deliver only rank's share (batch_size / world_size images) of each global batch;
            only those images are read.
        channels_last: deliver NCHW-shaped batches with channels-last strides (free on the staged path).
        prefetch: assemble batches in a background thread; None: whenever the dataset is on the CPU.
        staged: gather into host buffers and upload them (see the module docstring); None: when the
            dataset is on the CPU and ``device`` is CUDA. True on the CPU runs the same code with plain copies.

    ``next(stream)`` returns a float32 (batch_size / world_size, C, H, W) tensor in [-1, 1].
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, *, flip: bool | None = None,
                 device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, prefetch: bool | None = None, staged: bool | None = None):
        if not isinstance(dataset, ImageDataset):
            from .sources import load_dataset  # a convenience for arrays and paths

            dataset = load_dataset(dataset)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be an int >= 0, got {seed!r}")
        if len(dataset) < batch_size:
            raise DataError(f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size}: "
                            f"use a batch size of at most {len(dataset)} or add images")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise DataError(f"rank {rank} of {world_size} processes cannot share a batch of {batch_size}: "
                            "the batch must divide by the number of processes")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.flip = dataset.flip if flip is None else bool(flip)
        self.device = dataset.device if device is None else torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.channels_last = bool(channels_last)
        self.batches_per_epoch = len(dataset) // batch_size
        self.epoch = 0
        self.position = 0  # batches already drawn in the current epoch
        on_cpu = dataset.device.type == "cpu"
        self.staged = (on_cpu and self.device.type == "cuda") if staged is None else bool(staged)
        if self.staged and not on_cpu:
            raise DataError("staged batches gather on the host: keep the dataset on the CPU, or pass staged=False")
        self.prefetch = (on_cpu if prefetch is None else bool(prefetch)) or self.staged
        self._producer: _Prefetcher | None = None
        self._ring: _StagingRing | None = None
        self._finalizer = None
        self._direct = self._slicer()

    @property
    def batches_drawn(self) -> int:
        return self.epoch * self.batches_per_epoch + self.position

    @property
    def local_batch_size(self) -> int:
        """Images per delivered batch: this rank's share of the global batch."""
        return self.batch_size // self.world_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def _slicer(self) -> _Slicer:
        """This rank's (indices, flips) per batch number, with the epoch plans on the dataset's device (the
        staged path's dataset is on the host, so its plans are too)."""
        return _Slicer(_Plans(len(self.dataset), self.seed, self.flip, self.dataset.device), self.batches_per_epoch,
                       self.batch_size, self.rank, self.world_size)

    # assembly -------------------------------------------------------------------------------------
    def _assemble(self, slicer: _Slicer, n: int) -> torch.Tensor:
        """Batch n, float NCHW on the dataset's device (every path but the staged one)."""
        return _assemble(self.dataset, slicer, n, self.channels_last)

    def _start(self) -> None:
        slicer = self._slicer()  # the producer thread's own: its plans cache is not shared with _direct
        dataset, channels_last = self.dataset, self.channels_last
        if self.staged:
            if self._ring is None:
                _, h, w, c = dataset.pixels.shape
                self._ring = _StagingRing(PREFETCH_DEPTH + 2, (self.local_batch_size, h, w, c), dataset.storage_dtype,
                                          pin=self.device.type == "cuda")
            ring = self._ring

            def make(n, stop):
                idx, flips = slicer(n)
                i = ring.acquire(stop)
                buf = dataset.gather_pixels(idx, out=ring.buffers[i])
                if flips is not None:  # on the host, in place: the upload then carries finished pixels
                    flip_rows_(buf, flips)
                return i
        else:
            def make(n, stop):
                return _assemble(dataset, slicer, n, channels_last)

        self._producer = _Prefetcher(make, self.batches_drawn, PREFETCH_DEPTH)
        self._finalizer = weakref.finalize(self, self._producer.close)

    def _upload(self, i: int) -> torch.Tensor:
        """Staged path, training thread: start buffer i's upload, hand the buffer back, convert on the device."""
        ring = self._ring
        on_device = ring.buffers[i].to(self.device, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        else:
            on_device = on_device.clone() if on_device is ring.buffers[i] else on_device
        ring.release(i, event)
        return to_float_nchw(on_device, channels_last=self.channels_last)

    def __next__(self) -> torch.Tensor:
        n = self.batches_drawn
        if self.prefetch:
            if self._producer is None:
                self._start()
            try:
                item = self._producer.take(n)
            except BaseException:
                self.close()  # the thread has stopped; a retry starts a fresh one at the same batch
                raise
            batch = self._upload(item) if self.staged else item
        else:
            batch = self._assemble(self._direct, n)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if not self.staged and batch.device != self.device:
            batch = host_to_device(batch, self.device)
        return batch

    def close(self) -> None:
        """Stop the background thread (a later ``next`` starts it again)."""
        if self._finalizer is not None:
            self._finalizer()
        # buffers the stopped thread filled ahead never come back to the ring: a restart takes fresh ones
        self._producer, self._finalizer, self._ring = None, None, None

    # state ----------------------------------------------------------------------------------------
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
        self.close()  # batches made ahead belong to the old position
        self.seed, self.epoch, self.position = seed, epoch, position
        self._direct = self._slicer()
