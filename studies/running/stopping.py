"""SIGTERM and SIGINT stop a worker at a safe point: the running trial ends after its current batch.

The first signal only records itself; a training run hears it through `StopOnSignal` (a listener that
interrupts the run between batches), so a signal never cuts a database write or a file write in half.
The worker then re-queues the trial (to resume from its checkpoint) and exits with 128 + the signal.
A second signal stops at once: `WorkerStopped` is raised wherever the worker is.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

from pcvit import Listener

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class WorkerStopped(BaseException):
    """The worker was told to stop (BaseException: nothing in a trial swallows it)."""

    def __init__(self, signum: int):
        super().__init__(stop_reason(signum))
        self.signum = signum


def stop_reason(signum: int) -> str:
    return f"worker stopped by {signal.Signals(signum).name}"


class SignalGuard:
    """While installed: the first SIGTERM/SIGINT asks the running trial to stop; a second one raises.

    The worker owns one guard: it installs it around its loop and hands it to each trial's `StopOnSignal`.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.event = threading.Event()  # wakes an idle wait
        self.on_stop: Callable[[str], None] | None = None  # set by the running trial's StopOnSignal

    @contextlib.contextmanager
    def installed(self) -> Iterator["SignalGuard"]:
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def check(self) -> None:
        """Raise WorkerStopped if a signal came before a trial started: it is not started then."""
        if self.signum is not None:
            raise WorkerStopped(self.signum)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise WorkerStopped(self.signum)  # the second signal: now
        self.signum = signum
        self.event.set()
        if self.on_stop is not None:
            self.on_stop(stop_reason(signum))  # only sets flags that the training loop reads


class StopOnSignal(Listener):
    """Interrupts the run after its current batch when the worker's guard got a signal."""

    def __init__(self, guard: SignalGuard):
        self.guard = guard

    def on_start(self, run: Any) -> None:
        if self.guard.signum is not None:
            run.interrupt(stop_reason(self.guard.signum))
        self.guard.on_stop = run.interrupt

    def on_end(self, run: Any, result: Any) -> None:
        self.guard.on_stop = None
