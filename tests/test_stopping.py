"""A signal stops a training run between batches, never inside one; a second signal stops at once."""

from __future__ import annotations

import os
import signal

import pytest

from pcvit import Config, Listener, StopReason, train
from studies.running.stopping import SignalGuard, StopOnSignal, WorkerStopped
from tests.helpers import TINY_FIXED

pytestmark = pytest.mark.usefixtures("one_thread")


class SignalAtBatch(Listener):
    """Sends itself `signum` after the given (epoch, batch), counting the batches that ran."""

    wants_batches = True

    def __init__(self, at: tuple[int, int], signum: int = signal.SIGTERM, times: int = 1):
        self.at, self.signum, self.times = at, signum, times
        self.batches: list[tuple[int, int]] = []

    def on_batch(self, run, epoch, batch, metrics):
        self.batches.append((epoch, batch))
        if (epoch, batch) == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def tiny_config(**changes) -> Config:
    return Config.from_dict({**TINY_FIXED, "epochs": 3, "train_subset": 200, **changes})  # 4 batches an epoch


def test_sigterm_ends_the_run_after_the_current_batch():
    sender = SignalAtBatch(at=(2, 2))
    with SignalGuard().installed() as guard:
        result = train(tiny_config(), listeners=[sender, StopOnSignal(guard)])
    assert guard.signum == signal.SIGTERM
    assert result.stop_reason is StopReason.INTERRUPTED and result.stop_detail == "worker stopped by SIGTERM"
    assert sender.batches[-1] == (2, 2)  # the batch that got the signal finished; no later one started
    assert result.epochs_run == 1  # the partial epoch is not counted


def test_a_signal_before_training_stops_the_run_before_its_first_batch():
    with SignalGuard().installed() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        sender = SignalAtBatch(at=(0, 0))
        result = train(tiny_config(), listeners=[sender, StopOnSignal(guard)])
        assert guard.signum == signal.SIGINT and sender.batches == []
    assert result.stop_reason is StopReason.INTERRUPTED and result.epochs_run == 0


def test_a_second_signal_stops_at_once():
    sender = SignalAtBatch(at=(1, 1), times=2)
    with SignalGuard().installed() as guard, pytest.raises(WorkerStopped, match="SIGTERM"):
        train(tiny_config(), listeners=[sender, StopOnSignal(guard)])
    assert sender.batches == [(1, 1)]


def test_a_guard_without_a_signal_lets_the_run_finish_and_forgets_it():
    guard = SignalGuard()
    result = train(tiny_config(epochs=1), listeners=[StopOnSignal(guard)])
    assert result.stop_reason is StopReason.COMPLETED and result.epochs_run == 1
    assert guard.on_stop is None  # a later signal does not reach a finished run
