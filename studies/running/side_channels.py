"""Side channels (W&B, artifact uploads, checkpoints, images) never decide a trial's state: training does.

A W&B server out of reach, a full artifact disk or a broken image writer costs what it would have
recorded, with one warning that gives the reason; the trial still ends with its value. Only training
itself (a crash, out-of-memory, divergence) decides whether a trial completes, is pruned or fails.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from pcvit import Listener

log = logging.getLogger("pcvit.side_channels")


def best_effort(what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, or None with a warning naming `what` and the reason when it raises."""
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of a side channel is only worth a warning
        log.warning("%s failed (%s: %s); the trial goes on without it", what, type(exc).__name__, exc)
        return None


class Tolerant(Listener):
    """Forwards every call to `inner` until one raises; that one logs a warning, and `inner` is dropped."""

    def __init__(self, inner: Listener, what: str):
        self.inner, self.what = inner, what
        self.wants_batches = inner.wants_batches

    def _call(self, method: str, *args: Any) -> None:
        if self.inner is None:
            return
        try:
            getattr(self.inner, method)(*args)
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            log.warning("%s failed in %s (%s: %s); the trial goes on without it", self.what, method,
                        type(exc).__name__, exc)
            self.inner = None

    def on_start(self, run: Any) -> None:
        self._call("on_start", run)

    def on_batch(self, run: Any, epoch: int, batch: int, metrics: dict[str, Any]) -> None:
        self._call("on_batch", run, epoch, batch, metrics)

    def on_epoch(self, run: Any, epoch: int, metrics: dict[str, Any]) -> None:
        self._call("on_epoch", run, epoch, metrics)

    def on_probe(self, run: Any, epoch: int, accuracy: float) -> None:
        self._call("on_probe", run, epoch, accuracy)

    def on_images(self, run: Any, epoch: int, path: Any) -> None:
        self._call("on_images", run, epoch, path)

    def on_end(self, run: Any, result: Any) -> None:
        self._call("on_end", run, result)

    def close(self) -> None:
        if self.inner is not None and hasattr(self.inner, "close"):
            self._call("close")
