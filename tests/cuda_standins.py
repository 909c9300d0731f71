"""Stand-ins for the few ``torch.cuda`` objects the CUDA-only Python touches, so CPU CI runs that Python.

``CudaStandIns(monkeypatch)`` replaces, for one test, ``torch.cuda.CUDAGraph``, ``Event``, ``Stream``, ``stream``,
``current_stream``, ``set_stream``, ``device``, ``graph_pool_handle``, ``synchronize`` and ``empty_cache``
with recording stand-ins. (No sync-debug-mode stand-in: on the CPU every tensor is a host tensor, so a
stand-in could not tell a GPU sync from the host-side reads the code makes on purpose, e.g. the seeds'
range check; the cuda-marked tests run under the real mode "error".) torch's own ``torch.cuda.graph`` context manager is kept, so
its order of calls (synchronize, enter the capture stream, capture_begin ... capture_end, leave the
stream) is torch's, including what happens when capture_end raises.

A stand-in graph does what a CUDA graph does, on CPU tensors:

- capture records every aten op the captured code dispatches (a ``TorchDispatchMode``) and then undoes its
  effects: tensors that existed before the capture get their values back (a real capture launches
  nothing), tensors the capture allocated are poisoned (NaN; -1 for integers), as a graph's private
  memory holds garbage until the first replay writes it;
- an op that reads a value on the host (``.item()``, ``nonzero``...) fails the capture as CUDA does: the op
  raises, and capture_end raises "operation failed due to a previous error during capture";
- replay re-runs the recorded ops, in order, on the very tensors they saw (the static buffers and the
  capture's own intermediates), writing each result into the tensor the capture produced: a buffer the
  code replaced instead of refilling after the capture is not seen by the replay, as on a GPU.

So a replay computes exactly what the eager step computes (the same ops on the same values): tests
compare with ``rtol=0, atol=0``. ``log`` holds the calls in order, e.g. ``("capture_begin", pool)``,
``("replay", graph_id)``, ``("stream_enter", "capture-2")``. Nothing in the package changes: the stand-ins
are installed with pytest's monkeypatch and removed after the test.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# ops that read a tensor's value on the host: a sync on a GPU, not allowed while capturing
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
              aten.equal.default}


class FakeStream:
    """torch.cuda.Stream's stand-in: a name, and the waits it was asked for."""

    def __init__(self, standins: "CudaStandIns", name: str):
        self._standins, self.name = standins, name

    def wait_stream(self, other: "FakeStream") -> None:
        self._standins.log.append(("wait_stream", self.name, other.name))

    def synchronize(self) -> None:
        self._standins.log.append(("stream_synchronize", self.name))

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


def _written_tensors(func, args, kwargs):
    """The tensors an op writes into (its ``Tensor(a!)`` arguments)."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = kwargs.get(arg.name) if arg.name in kwargs else (args[i] if i < len(args) else None)
            written += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return written


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    """Records the ops dispatched during a capture; keeps what they overwrote to undo it afterwards."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.saved = {}  # id -> (tensor, its value before the capture's first write)
        self.created = []  # tensors the capture allocated
        self.created_storages = set()
        self.error = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            self.error = f"{func} reads a value on the host"
            raise RuntimeError(f"CUDA error: operation not permitted when stream is capturing (stand-in: {self.error})")
        for t in _written_tensors(func, args, kwargs):
            if id(t) not in self.saved and _storage(t) not in self.created_storages:
                self.saved[id(t)] = (t, t.clone())
        inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage(t) not in inputs and t.numel():
                self.created.append(t)
                self.created_storages.add(_storage(t))
        self.ops.append((func, args, kwargs, out))
        return out

    def undo(self) -> None:
        """What a capture leaves: the old values of existing tensors, garbage in the ones it allocated."""
        for t, before in self.saved.values():
            t.copy_(before)
        for t in self.created:
            t.fill_(float("nan") if t.is_floating_point() else -1)


class FakeGraph:
    """torch.cuda.CUDAGraph's stand-in (see the module docstring)."""

    def __init__(self, standins: "CudaStandIns"):
        self._standins = standins
        self.id = next(standins._ids)
        self._recorder = None
        self.ops = None
        self.pool_handle = None

    def capture_begin(self, pool=None, capture_error_mode="global", **_):
        self.pool_handle = pool
        self._standins.log.append(("capture_begin", self.id, pool, self._standins.current.name))
        self._recorder = _Recorder()
        self._recorder.__enter__()

    def capture_end(self):
        recorder, self._recorder = self._recorder, None
        recorder.__exit__(None, None, None)
        self._standins.log.append(("capture_end", self.id, recorder.error))
        if not self._standins.capture_runs_ops or recorder.error is None:
            recorder.undo()
        if recorder.error is not None:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.ops = recorder.ops

    def replay(self):
        if self.ops is None:
            raise RuntimeError("stand-in graph: replay() before a successful capture")
        self._standins.log.append(("replay", self.id, self._standins.current.name))
        for func, args, kwargs, out in self.ops:
            inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            new = func(*args, **kwargs)
            for old, value in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                # results into the tensors the capture produced; views and in-place results already are
                if isinstance(old, torch.Tensor) and _storage(old) not in inputs and old.numel():
                    old.copy_(value)

    def pool(self):
        return self.pool_handle


class FakeEvent:
    """torch.cuda.Event's stand-in: record() reads the host clock (the CPU ran the work synchronously)."""

    def __init__(self, standins: "CudaStandIns", enable_timing: bool = False, **_):
        self._standins, self.enable_timing, self.t = standins, enable_timing, None

    def record(self, stream=None):
        import time

        self.t = time.perf_counter()
        self._standins.log.append(("event_record",))

    def synchronize(self):
        self._standins.log.append(("event_synchronize",))

    def elapsed_time(self, end: "FakeEvent") -> float:
        if not (self.enable_timing and end.enable_timing) or self.t is None or end.t is None:
            raise RuntimeError("stand-in event: both events need enable_timing=True and a record()")
        return (end.t - self.t) * 1e3  # milliseconds, as CUDA's


class _StreamContext:
    """torch.cuda.stream's stand-in, a plain context manager like torch's StreamContext: the stream is
    current from __enter__, the previous one comes back in __exit__, and only there (torch.cuda.graph
    calls __exit__ after capture_end, so a raising capture_end skips it)."""

    def __init__(self, standins: "CudaStandIns", stream: FakeStream):
        self._standins, self.stream, self.before = standins, stream, None

    def __enter__(self):
        self.before = self._standins.current
        self._standins.current = self.stream
        self._standins.log.append(("stream_enter", self.stream.name))

    def __exit__(self, *exc):
        self._standins.current = self.before
        self._standins.log.append(("stream_exit", self.stream.name))


class CudaStandIns:
    """Installs the stand-ins for one test (``monkeypatch``); ``log`` records the calls in order.

    capture_runs_ops: leave the effects of a *failed* capture's ops in place (the worst case the sampler
    guards against) instead of undoing them.
    """

    def __init__(self, monkeypatch, capture_runs_ops: bool = False):
        self.log = []
        self.capture_runs_ops = capture_runs_ops
        self._ids = itertools.count(1)
        self.default = FakeStream(self, "default")
        self.current = self.default
        self.graphs = []
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "CUDAGraph", self._graph)
        monkeypatch.setattr(cuda, "Event", lambda **kw: FakeEvent(self, **kw))
        monkeypatch.setattr(cuda, "Stream", self._stream)
        monkeypatch.setattr(cuda, "stream", self._stream_context)
        monkeypatch.setattr(cuda, "current_stream", self._current_stream)
        monkeypatch.setattr(cuda, "set_stream", self._set_stream)
        monkeypatch.setattr(cuda, "device", self._device)
        monkeypatch.setattr(cuda, "graph_pool_handle", self._pool_handle)
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: self.log.append(("synchronize",)))
        monkeypatch.setattr(cuda, "empty_cache", lambda: self.log.append(("empty_cache",)))
        monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)
        monkeypatch.setattr(cuda.graph, "default_capture_stream", None)

    # -- the stand-ins --------------------------------------------------------------------------------
    def _graph(self) -> FakeGraph:
        graph = FakeGraph(self)
        self.graphs.append(graph)
        self.log.append(("CUDAGraph", graph.id))
        return graph

    def _stream(self, device=None, priority=0, **_) -> FakeStream:
        stream = FakeStream(self, f"stream-{next(self._ids)}")
        self.log.append(("Stream", stream.name))
        return stream

    def _stream_context(self, stream) -> "_StreamContext":
        return _StreamContext(self, stream)

    def _current_stream(self, device=None) -> FakeStream:
        return self.current

    def _set_stream(self, stream) -> None:
        self.log.append(("set_stream", stream.name))
        self.current = stream

    @contextlib.contextmanager
    def _device(self, device):
        self.log.append(("device", str(device)))
        yield

    def _pool_handle(self):
        handle = ("pool", next(self._ids))
        self.log.append(("graph_pool_handle", handle))
        return handle

    # -- reading the log ------------------------------------------------------------------------------
    def events(self, *names: str) -> list:
        """The logged calls whose name is one of ``names``, in order."""
        return [e for e in self.log if e[0] in names]
