"""The worker loop: join the study, pull trials until the study's budget is spent, never leave a zombie.

* Study: loaded, or created from the study file when absent (also after `optuna create-study`, which
  makes it without our attributes). The file's canonical content is stored as the study user attribute
  `study_spec` (and its text as `study_file`); a worker whose file differs refuses and prints the diff.
* Budget, exact under concurrency: the first `n_trials` fresh trials by trial number are the budget
  (retries of a crashed trial are not fresh and do not count). A worker counts before it asks; if several
  asked at once, a trial whose number ranks beyond the budget is marked `pcvit:surplus`, failed at once
  without training, and left out of reports. Trial numbers are assigned atomically by the storage, so
  exactly `n_trials` trials train, whatever the number of workers.
* Signals: SIGTERM (docker stop) or SIGINT stops training at once; the trial is failed with the reason and
  re-queued (to resume from its checkpoint), then the worker exits with 128 + the signal number.
* Errors: a CUDA out-of-memory error fails the trial with the reason, frees the cache, and the worker
  goes on; so does any other error, unless three trials in a row fail (then the worker stops: a bug or a
  broken machine should not burn the budget).
* When the budget is spent the worker waits while other trials still run, reaping dead ones and running
  their retries, so a crashed trial is finished even when its worker is gone; then it exits 0.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
import traceback
import warnings
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState

import storage
from storage import mask_password, retry_db
from storage.recovery import (SPEC_ATTR, Heartbeat, claim, fail_trial, is_retry, reap_stale_trials, requeue,
                              retry_stale_trial)
from studies.spec import StudyFileError, StudySpec, canonical, spec_diff, spec_from_document

log = logging.getLogger("pcvit.worker")
SURPLUS = "pcvit:surplus"  # system attr of a trial created beyond the budget by a concurrent ask
MAX_FAILURES_IN_A_ROW = 3


class WorkerStopped(BaseException):
    """Raised inside a running trial when the worker gets SIGTERM or SIGINT (BaseException: nothing swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"worker stopped by {signal.Signals(signum).name}")
        self.signum = signum


class SignalGuard:
    """SIGTERM/SIGINT: raise WorkerStopped while a trial trains (`armed`), else just remember the signal."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.event = threading.Event()  # wakes an idle wait
        self._armed = False

    @contextlib.contextmanager
    def installed(self) -> Iterator["SignalGuard"]:
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        if self.signum is not None:
            raise WorkerStopped(self.signum)
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        self.event.set()
        if self._armed and first:
            self._armed = False  # a second signal must not interrupt the clean-up
            raise WorkerStopped(signum)


# --- the study ----------------------------------------------------------------------------------------
def join_study(storage: Any, url: str, name: str, spec: StudySpec, sampler: Any, pruner: Any) -> optuna.Study:
    """Load study `name`, or create it from the file; refuse (StudyFileError) when the stored study differs."""
    where = f"study {name!r} in {mask_password(url)}"
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction=spec.direction, load_if_exists=True)
        log.info("created %s from %s", where, spec.source)
    if len(study.directions) != 1 or study.direction.name.lower() != spec.direction:
        stored = ", ".join(d.name.lower() for d in study.directions)
        raise StudyFileError(f"{spec.source}: direction: the file says {spec.direction} but {where} is to {stored} "
                             f"(create it with `optuna create-study --direction {spec.direction}`)")
    mine = canonical(spec.document)
    stored_spec = study.user_attrs.get(SPEC_ATTR)
    if stored_spec is None:
        study.set_user_attr("study_file", spec.text)
        study.set_user_attr(SPEC_ATTR, mine)
        stored_spec = study.user_attrs.get(SPEC_ATTR)  # another worker may have won the race
    if stored_spec != mine:
        lines = "\n  ".join(spec_diff(stored_spec, mine))
        raise StudyFileError(f"{spec.source} differs from the study file stored with {where}; this worker "
                             f"refuses to join. Differences:\n  {lines}")
    return study


def open_existing_study(url: str, name: str) -> tuple[optuna.Study, StudySpec]:
    """An existing study and its stored study file, with the heartbeat settings that file chose."""
    where = f"study {name!r} in {mask_password(url)}"
    storage.require_existing(url)  # a mistyped path must not leave an empty database behind
    try:
        study = optuna.load_study(study_name=name, storage=storage.open_storage(url))
    except KeyError:
        raise StudyFileError(f"{where} does not exist") from None
    if SPEC_ATTR not in study.user_attrs:
        raise StudyFileError(f"{where} has no stored study file: no pcvit-worker has joined it yet")
    spec = spec_from_document(study.user_attrs[SPEC_ATTR], where, study.user_attrs.get("study_file", ""))
    db = storage.open_storage(url, spec.heartbeat_interval, spec.grace_period, retry_stale_trial)
    return optuna.load_study(study_name=name, storage=db), spec


# --- the budget ---------------------------------------------------------------------------------------
def fresh_trials(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials that consume budget: everything but retries of crashed trials."""
    return [t for t in trials if not is_retry(t)]


def next_trial(study: optuna.Study, spec: StudySpec) -> optuna.Trial | None:
    """A retry waiting in the queue, else a new trial within the budget, else None."""
    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if not waiting and len(fresh_trials(trials)) >= spec.n_trials:
        return None
    with warnings.catch_warnings():  # we run our own loop (and heartbeat) instead of Study.optimize
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    frozen = study._storage.get_trial(trial._trial_id)
    if is_retry(frozen):
        return trial
    earlier = [t for t in fresh_trials(study.get_trials(deepcopy=False)) if t.number < trial.number]
    if len(earlier) < spec.n_trials:
        return trial
    study._storage.set_trial_system_attr(trial._trial_id, SURPLUS, True)
    fail_trial(study, frozen, f"surplus: the budget of {spec.n_trials} trials was spent while this worker asked")
    return None


# --- the loop -----------------------------------------------------------------------------------------
def run_worker(study: optuna.Study, spec: StudySpec, objective: Callable[[optuna.Trial], float],
               max_trials: int | None = None) -> int:
    """Run trials until the budget is spent (or `max_trials` ran here); return the worker's exit code."""
    guard = SignalGuard()
    ran = failures_in_a_row = 0
    with guard.installed():
        while guard.signum is None and (max_trials is None or ran < max_trials):
            reaped = retry_db(reap_stale_trials, study, spec.grace_period)
            if reaped:
                log.warning("reaped dead trials %s", reaped)
            trial = retry_db(next_trial, study, spec)
            if trial is None:
                running = retry_db(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,))
                if not running:
                    log.info("the study's budget of %d trials is spent and no trial is left to run", spec.n_trials)
                    break
                log.info("budget spent; waiting for running trials %s", [t.number for t in running])
                guard.event.wait(spec.heartbeat_interval)
                continue
            ran += 1
            outcome = run_trial(study, trial, objective, guard, spec)
            failures_in_a_row = failures_in_a_row + 1 if outcome == "error" else 0
            if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                log.error("%d trials in a row failed with errors: stopping this worker", failures_in_a_row)
                return 1
    if guard.signum is not None:
        log.warning("stopped by %s", signal.Signals(guard.signum).name)
        return 128 + guard.signum
    return 0


def run_trial(study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float],
              guard: SignalGuard, spec: StudySpec) -> str:
    """One trial, told to the storage whatever happens. Returns complete/pruned/interrupted/oom/error."""
    import torch

    retry_db(claim, study, trial)
    value, state, outcome, reason = None, TrialState.FAIL, "error", ""
    try:
        with Heartbeat(study._storage, trial._trial_id), guard.armed():
            value = objective(trial)
        state, outcome = TrialState.COMPLETE, "complete"
    except optuna.TrialPruned as exc:
        state, outcome = TrialState.PRUNED, "pruned"
        log.info("trial %d pruned: %s", trial.number, exc)
    except WorkerStopped as exc:
        outcome, reason = "interrupted", str(exc)
    except torch.OutOfMemoryError as exc:
        outcome, reason = "oom", f"CUDA out of memory: {str(exc).splitlines()[0]}"
    except Exception as exc:  # noqa: BLE001 - a failed trial is data; the worker goes on
        reason = f"{type(exc).__name__}: {exc}"
        log.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
    finally:
        gc.collect()  # drop the dead trial's tensors before the next one allocates
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    try:
        if reason:
            retry_db(trial.set_user_attr, "fail_reason", reason)
        retry_db(study.tell, trial, value, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was finished by another process (reaped during an outage?)", trial.number)
        return outcome
    if outcome == "interrupted":
        frozen = retry_db(study._storage.get_trial, trial._trial_id)
        retry_db(requeue, study, frozen, spec.max_retries, f"trial {trial.number}: {reason}")
    elif reason:
        log.warning("trial %d failed: %s", trial.number, reason)
    return outcome
