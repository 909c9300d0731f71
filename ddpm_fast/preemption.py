"""Stop a training or sampling run cleanly on SIGTERM or SIGINT (cluster preemption, Ctrl-C).

SLURM and Kubernetes send SIGTERM and kill a little later. Inside :class:`StopSignals` the first SIGTERM or
SIGINT only raises a flag; the training loop reads it after each step, all ranks agree on the step, rank 0
writes a checkpoint and the run ends. A second signal exits at once (status 128 + signal number): the
checkpoint files are written to temporary names and renamed into place, so the last complete
checkpoint stays loadable whatever moment the process dies.

A signal arriving within ``grace_s`` (1 s) of the first counts as the same request: launchers forward the
signal they get (torchrun sends SIGTERM to its workers on SIGINT or SIGTERM), and schedulers often signal
the launcher and the workers alike, so one request can reach a worker twice in quick succession.
"""

from __future__ import annotations

import os
import signal
import threading
import time

__all__ = ["StopSignals"]

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT set :attr:`requested` instead of killing the process.

    announce: write one line to stderr on each signal (rank 0 only, so N processes do not print N lines).
    grace_s: repeats within this many seconds of the first signal are ignored (see the module docstring).
    Handlers can only be installed from the main thread; elsewhere the context does nothing and signals
    keep their usual effect.
    finishing / kept: what the first signal's line says happens next, and what the second's says is
    kept (training's checkpoint by default; ``sample`` names its progress).
    """

    def __init__(self, *, announce: bool = True, grace_s: float = 1.0, exit=os._exit, clock=time.monotonic,
                 finishing: str = "finishing this step, then writing a checkpoint",
                 kept: str = "the last complete checkpoint stays loadable"):
        self.announce = announce
        self.finishing, self.kept = finishing, kept
        self.grace_s = grace_s
        self.signal_name: str | None = None  # "SIGTERM" or "SIGINT" once requested
        self._first_at: float | None = None
        self._exit, self._clock = exit, clock
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.signal_name is not None

    def _say(self, text: str) -> None:
        if self.announce:
            # os.write: print() is not safe to re-enter from a handler that interrupted another print
            os.write(2, f"ddpm-fast: {text}\n".encode())

    def handle(self, signum: int, frame=None) -> None:
        """The signal handler (public so that tests can call it without sending signals)."""
        name = signal.Signals(signum).name
        now = self._clock()
        if self._first_at is None:
            self.signal_name, self._first_at = name, now
            self._say(f"{name}: {self.finishing} (send it again to exit at once)")
            return
        if now - self._first_at < self.grace_s:
            return
        self._say(f"second {name}: exiting at once; {self.kept}")
        self._exit(128 + signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
