"""The process group: one process, or many launched by torchrun, behind one small object.

``torchrun`` starts one process per device and tells each its place through the environment (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). :func:`process_group` reads it,
joins the group (nccl on CUDA, gloo on the CPU), puts each process on ``cuda:LOCAL_RANK`` and leaves the
group on the way out, on success and on error alike. Without torchrun's environment it starts nothing:
a single process never touches ``torch.distributed`` and behaves exactly as before.

Every collective waits at most ``DDPM_FAST_DIST_TIMEOUT`` seconds (default 600): a rank that died or
hangs makes the others fail with one line (:class:`DistributedError`) instead of waiting forever.

Also here: :func:`resolve_device` (the device a process should use) and :func:`deal` (EDM's round-robin
of seed batches to ranks).
"""

from __future__ import annotations

import datetime
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import DDPMFastError

__all__ = ["Group", "DistributedError", "process_group", "current_group", "launched", "env_rank",
           "env_world_size", "planned_world_size", "resolve_device", "deal", "collective_errors", "group_was_started",
           "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S"]

TIMEOUT_ENV = "DDPM_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0

# Set once this process has joined a group: errors raised before that are a pure function of the command
# line and the files, so every rank raises the same one and only rank 0 needs to print it.
_started = False

# What gloo and nccl put in the RuntimeError they raise when a peer is gone or a collective timed out.
_COLLECTIVE_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
                       "processgroup", "c10d", "broken pipe")


class DistributedError(DDPMFastError, RuntimeError):
    """A collective failed: another rank died, hung past the timeout or could not be reached."""


# --------------------------------------------------------------------------------------------------
# the environment


def launched() -> bool:
    """True when torchrun (or another launcher setting RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise DDPMFastError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


def env_rank() -> int:
    """This process's global rank from the environment (0 without a launcher)."""
    return _env_int("RANK", 0) if launched() else 0


def env_world_size() -> int:
    """The number of processes from the environment (1 without a launcher)."""
    return _env_int("WORLD_SIZE", 1) if launched() else 1


def planned_world_size() -> int:
    """The world size a run will have: an initialized group's, else the environment's (1 without a
    launcher). Needs no collective, so it can be checked before the ranks meet."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def timeout_seconds() -> float:
    """The start-up and collective timeout: ``DDPM_FAST_DIST_TIMEOUT`` seconds, default 600."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise DDPMFastError(f"{TIMEOUT_ENV}={text!r}: give the collective timeout in seconds, e.g. 600")
    return value


def group_was_started() -> bool:
    """Whether this process has joined a process group (see :func:`process_group`)."""
    return _started


def resolve_device(device=None) -> torch.device:
    """The torch.device this process should use, with a one-line error for bad or absent devices.

    device: None (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N". Under torchrun "cuda" (and
    None) mean ``cuda:LOCAL_RANK``; naming one GPU for several processes is an error.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported: use cpu, cuda or cuda:N")
    if device.type == "cuda" and launched():
        local_rank = _env_int("LOCAL_RANK", 0)
        if device.index is not None and device.index != local_rank and env_world_size() > 1:
            raise ValueError(f"--device {device} names one GPU for {env_world_size()} processes: pass --device "
                             "cuda (each process takes cuda:LOCAL_RANK)")
        if device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs here: "
                                 "start at most one process per GPU (--nproc-per-node)")
            device = torch.device("cuda", local_rank)
    return device


# --------------------------------------------------------------------------------------------------
# the group


@dataclass(frozen=True)
class Group:
    """Where this process stands: rank, world size, device, and the collectives the engine needs.

    A single process is ``Group()``: rank 0 of 1, ``active`` False, and every method a no-op that
    returns its input, so calling code needs no branches.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no torch.distributed in this process
    cpu_group: object = None  # a gloo group for small host-side collectives (flags, counts)

    @property
    def active(self) -> bool:
        """True when this process belongs to a torch.distributed group."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and progress bars."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (on the host-side group: no device sync)."""
        if self.active:
            with collective_errors("barrier"):
                torch.distributed.barrier(group=self.cpu_group)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a float tensor across ranks (same shape, on its device)."""
        if not self.active:
            return value
        value = value.detach().clone()
        with collective_errors("all_reduce"):
            torch.distributed.all_reduce(value)
        return value / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (host-side; no device sync)."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        with collective_errors("all_reduce"):
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.cpu_group)
        return bool(t.item())

    def sum_int(self, n: int) -> int:
        """The sum of an int across ranks (host-side)."""
        if not self.active:
            return int(n)
        t = torch.tensor([int(n)], dtype=torch.int64)
        with collective_errors("all_reduce"):
            torch.distributed.all_reduce(t, group=self.cpu_group)
        return int(t.item())

    def all_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), indexed by rank, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        with collective_errors("all_gather_object"):
            torch.distributed.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def gather_rows(self, rows: torch.Tensor, counts: list[int], *, to_all: bool = False) -> torch.Tensor | None:
        """Concatenate every rank's ``rows`` along dim 0, rank by rank.

        rows: (counts[rank], ...) on any device, same dtype and trailing shape on every rank. counts:
        the row count of every rank (known to all). Returns the (sum(counts), ...) CPU tensor on rank 0
        (on every rank with ``to_all``), None elsewhere. Rows are padded to max(counts) so one fixed-size
        collective carries them.
        """
        if not self.active:
            return rows.cpu()
        if rows.shape[0] != counts[self.rank]:
            raise ValueError(f"rank {self.rank} holds {rows.shape[0]} rows, counts says {counts[self.rank]}")
        most = max(counts)
        padded = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=self.device)
        padded[: rows.shape[0]] = rows.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        with collective_errors("gather"):
            if to_all:
                torch.distributed.all_gather(parts, padded)
            else:
                torch.distributed.gather(padded, parts if self.is_main else None, dst=0)
        if not (to_all or self.is_main):
            return None
        return torch.cat([p[:c].cpu() for p, c in zip(parts, counts)])


def current_group() -> Group:
    """The :class:`Group` of an already initialized torch.distributed group (else a single process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    backend = dist.get_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = _env_int("LOCAL_RANK", rank)
    if "nccl" in str(backend):
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    cpu_group = _cpu_group(backend)
    return Group(rank, local_rank, world, device, str(backend), cpu_group)


_CPU_GROUPS: dict = {}


def _cpu_group(backend):
    # Flags and counts travel over gloo on the host so that checking them never syncs the GPU.
    if "gloo" in str(backend) and "nccl" not in str(backend):
        return None  # the default group already is a gloo group
    if backend not in _CPU_GROUPS:
        _CPU_GROUPS[backend] = torch.distributed.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=timeout_seconds()))
    return _CPU_GROUPS[backend]


@contextmanager
def process_group(device=None):
    """Join torchrun's process group for the duration of a ``with`` block; yields a :class:`Group`.

    device: as for :func:`resolve_device` (each rank gets ``cuda:LOCAL_RANK`` on CUDA). Backend: nccl
    for CUDA, gloo for the CPU. Without torchrun's environment nothing is started (``Group()`` on the
    resolved device). A group initialized by the caller is used as it is and left open: a script that
    runs several jobs in one torchrun process wraps them all in one ``with process_group(...)`` block
    (joining a second time after leaving does not work reliably under torchrun's rendezvous store).
    """
    global _started
    dist = torch.distributed
    device = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        yield current_group()
        return
    if not launched():
        yield Group(device=device)
        return
    if not dist.is_available():
        raise DDPMFastError("this torch build has no torch.distributed: run a single process (no torchrun)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_seconds())
    try:
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the process group ({_first_line(exc)}): check that every "
                               f"process started and can reach MASTER_ADDR:MASTER_PORT") from None
    _started = True
    try:
        group = Group(dist.get_rank(), _env_int("LOCAL_RANK", 0), dist.get_world_size(), device, backend,
                      _cpu_group(backend))
        yield group
        # every rank reaches teardown before any closes its connections: a rank still inside its last
        # collective (or gloo's connection threads) must not see its peer vanish (not on errors: a dead
        # peer would make this wait for the timeout)
        group.barrier()
    finally:
        _CPU_GROUPS.clear()
        try:
            dist.destroy_process_group()
        except Exception:  # a group broken by a dead peer may refuse a clean shutdown; we are leaving anyway
            pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else exc.__class__.__name__)


@contextmanager
def collective_errors(what: str):
    """Turn the RuntimeError a failed collective raises (a dead peer, a timeout) into a one-line
    :class:`DistributedError`; other errors pass through unchanged."""
    try:
        yield
    except DDPMFastError:
        raise
    except RuntimeError as exc:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise  # a single process has no collectives to blame
        text = str(exc).lower()
        dist_error = getattr(torch.distributed, "DistError", ())
        if (dist_error and isinstance(exc, dist_error)) or any(m in text for m in _COLLECTIVE_MARKERS):
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else env_rank()
            raise DistributedError(f"rank {rank}: {what} failed, another process died or stopped answering "
                                   f"({_first_line(exc)[:160]})") from None
        raise


# --------------------------------------------------------------------------------------------------
# sharding


def deal(num_items: int, max_batch: int, world_size: int, rank: int) -> list[range]:
    """EDM's deal: split ``num_items`` into batches of at most ``max_batch`` and give rank r the batches
    r, r + world, r + 2 world, ... Every rank gets the same number of batches (some possibly empty), so
    per-batch collectives stay in step. Returns this rank's batches as ranges of item positions.
    """
    if num_items < 1 or max_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"cannot deal {num_items} items in batches of {max_batch} to rank {rank} of {world_size}")
    num_batches = math.ceil(num_items / (max_batch * world_size)) * world_size
    # numpy.array_split's sizes: the first (num_items % num_batches) batches get one more item
    base, extra = divmod(num_items, num_batches)
    starts = [i * base + min(i, extra) for i in range(num_batches + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(rank, num_batches, world_size)]
