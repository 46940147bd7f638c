"""What a worker tells the person watching it: one line per finished trial, one per epoch.

    trial 7 COMPLETE 0.6330 (hidden_size=32, peak_lr_hidden=0.0951) in 9.5 min | 8/20 done, ~1.9 h left
    trial 7 epoch 3/10: train_mse 0.0906, probe_accuracy 0.629 (72 s)

The time left is the mean duration of the study's finished trials times the trials still to run, divided by
the trials running now (the workers at work): a rough guide that improves as trials finish.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import TrialState

from pcvit import Listener

log = logging.getLogger("pcvit.worker")
SHOWN_METRICS = ("train_mse", "val_mse", "probe_accuracy")


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def trial_line(study: optuna.Study, number: int, state: TrialState, value: float | None, params: dict[str, Any],
               seconds: float, budget: int, is_fresh: Any) -> str:
    """The line for a finished trial, with the study's progress (fresh trials count against `budget`)."""
    trials = [t for t in study.get_trials(deepcopy=False) if is_fresh(t)]
    finished = [t for t in trials if t.state.is_finished()]
    running = sum(t.state == TrialState.RUNNING for t in trials)
    spans = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished
             if t.datetime_start and t.datetime_complete]
    left = max(0, budget - len(finished))
    eta = ""
    if spans and left:
        eta = f", ~{duration(sum(spans) / len(spans) * left / max(1, running))} left"
    shown = ", ".join(f"{k}={short(v)}" for k, v in params.items())
    result = "" if value is None else f" {short(value)}"
    return (f"trial {number} {state.name}{result} ({shown}) in {duration(seconds)} | "
            f"{min(len(finished), budget)}/{budget} done{eta}")


class EpochLine(Listener):
    """One log line per epoch of a trial (also when the worker's output goes to a file)."""

    def __init__(self, number: int):
        self.number = number

    def on_epoch(self, run: Any, epoch: int, metrics: dict[str, Any]) -> None:
        shown = ", ".join(f"{k} {short(float(metrics[k]))}" for k in SHOWN_METRICS if metrics.get(k) is not None)
        seconds = metrics.get("epoch_time_s")
        took = f" ({duration(seconds)})" if isinstance(seconds, (int, float)) else ""
        log.info("trial %d epoch %d/%d: %s%s", self.number, epoch, run.config.epochs, shown, took)
