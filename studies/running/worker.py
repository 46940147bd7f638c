"""The worker loop: join the study, pull trials until the study's budget is spent, never leave a zombie.

* Study: loaded, or created from the study file when absent (also after `optuna create-study`, which
  makes it without our attributes). The file's canonical content is stored as the study attribute
  `study_spec` (system attributes, with its text as `study_file`; the user attribute `study_file` names the
  file); a worker whose file differs refuses and prints the diff.
* Grid: every worker shuffles the grid with the same seed (`studies.studyfile.samplers`). Optuna's GridSampler
  gives trial number n the n-th point of its shuffled grid; with the order shared, the trial numbers the storage
  hands out make every point run exactly once whatever the number of workers. Other samplers keep one seed per
  worker (they must draw differently).
* Budget, exact under concurrency: the first `n_trials` fresh trials by trial number are the budget
  (retries of a crashed trial are not fresh and do not count). A worker counts before it asks; if several
  asked at once, a trial whose number ranks beyond the budget is marked `pcvit:surplus`, failed at once
  without training, and left out of reports. Trial numbers are assigned atomically by the storage, so
  exactly `n_trials` trials train, whatever the number of workers.
* Signals: SIGTERM (docker stop) or SIGINT stops the running trial after its current batch (never inside a
  database or file write); the trial is failed with the reason and re-queued (to resume from its
  checkpoint), then the worker exits with 128 + the signal number. A second signal stops at once.
* Dead workers: a `Reaper` thread beats for the running trial and re-queues the trials of dead workers
  within the grace period, even while every worker is busy (see `studies.running.reaper`).
* Errors: a CUDA out-of-memory error fails the trial with the reason, frees the cache, and the worker
  goes on; so does any other error, unless three trials in a row fail (then the worker stops: a bug or a
  broken machine should not burn the budget).
* When the budget is spent the worker waits while other trials still run, running the retries of dead
  ones, so a crashed trial is finished even when its worker is gone; then it removes the checkpoints of
  finished trials that a killed worker left behind, and exits 0.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import time
import traceback
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

import storage
from storage import mask_password
from storage.checkpoints import CheckpointFiles, lineage_of
from storage.locks import storage_lock
from storage.optuna_access import (fail_if_running, optimize_loop, set_system_attr, set_user_attr, stored_trial,
                                   study_id, trial_id, use_heartbeats)
from studies.running.owners import claim
from studies.running.progress import trial_line
from studies.running.reaper import Reaper
from studies.running.retries import (fail_for_retry, is_retry, lineage, lineage_done, missing_retries,
                                     repair_missing_retries, requeue)
from studies.running.stopping import SignalGuard, WorkerStopped
from studies.studyfile.study_source import resolve_spec
from studies.studyfile.spec import (StudyFileError, StudySpec, canonical, spec_diff, store_document, stored_document,
                                    stored_spec)

log = logging.getLogger("pcvit.worker")
SURPLUS = "pcvit:surplus"  # system attr of a trial created beyond the budget by a concurrent ask
MAX_FAILURES_IN_A_ROW = 3


# --- the study ----------------------------------------------------------------------------------------
def join_study(storage: Any, url: str, name: str | None, spec: StudySpec | None,
               sampler_seed: int) -> tuple[optuna.Study, StudySpec]:
    """Load study `name` (once), or create it from the study file; return it with its study file.

    `spec` is the file given on the command line; without one, the file stored with the study (or the
    packaged `studies/NAME.yaml`) is used. Refuses (StudyFileError) when the stored study differs. The study
    samples with this worker's `sampler_seed`, prunes with the file's pruner, and beats as the file says.
    """
    name = name or (spec.name if spec else None)
    where = f"study {name!r} in {mask_password(url)}"
    try:
        study = optuna.load_study(study_name=name, storage=storage) if name else None
    except KeyError:
        study = None
    if spec is None:
        spec = resolve_spec(study, name, where)
    if study is None:
        study = optuna.create_study(study_name=name, storage=storage, direction=spec.direction, load_if_exists=True)
        log.info("created %s from %s", where, spec.source)
    study.sampler, study.pruner = spec.make_sampler(sampler_seed), spec.make_pruner()
    use_heartbeats(study, spec.heartbeat_interval, spec.grace_period)
    if len(study.directions) != 1 or study.direction.name.lower() != spec.direction:
        stored = ", ".join(d.name.lower() for d in study.directions)
        raise StudyFileError(f"{spec.source}: direction: the file says {spec.direction} but {where} is to {stored} "
                             f"(create it with `optuna create-study --direction {spec.direction}`)")
    mine = canonical(spec.document)
    stored_spec, _ = stored_document(study)
    if stored_spec is None:
        with storage_lock(storage, f"join:{name}"):  # the first worker's file wins; the others compare with it
            stored_spec, _ = stored_document(study)
            if stored_spec is None:
                store_document(study, spec)
                stored_spec = mine
    if stored_spec != mine:
        lines = "\n  ".join(spec_diff(stored_spec, mine))
        raise StudyFileError(f"{spec.source} differs from the study file stored with {where}; this worker "
                             f"refuses to join. Differences:\n  {lines}")
    return study, spec


def open_existing_study(url: str, name: str) -> tuple[optuna.Study, StudySpec]:
    """An existing study and its stored study file, with the heartbeat settings that file chose."""
    where = f"study {name!r} in {mask_password(url)}"
    storage.require_existing(url)  # a mistyped path must not leave an empty database behind
    try:
        study = optuna.load_study(study_name=name, storage=storage.open_storage(url))
    except KeyError:
        raise StudyFileError(f"{where} does not exist") from None
    spec = stored_spec(study, where)
    if spec is None:
        raise StudyFileError(f"{where} has no stored study file: no pcvit-worker has joined it yet")
    use_heartbeats(study, spec.heartbeat_interval, spec.grace_period)
    return study, spec


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
    if not waiting and isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
        return None  # every grid point has run: a new trial would repeat one
    trial = study.ask()
    frozen = stored_trial(study, trial)
    if is_retry(frozen):
        return trial
    earlier = [t for t in fresh_trials(study.get_trials(deepcopy=False)) if t.number < trial.number]
    if len(earlier) < spec.n_trials:
        return trial
    set_system_attr(study, trial, SURPLUS, True)
    reason = f"surplus: the budget of {spec.n_trials} trials was spent while this worker asked"
    set_user_attr(study, trial, "fail_reason", reason)
    fail_if_running(study, trial)
    return None


# --- the loop -----------------------------------------------------------------------------------------
def run_worker(study: optuna.Study, spec: StudySpec, objective: Callable[[optuna.Trial], float],
               max_trials: int | None = None, checkpoints: CheckpointFiles | None = None,
               guard: SignalGuard | None = None) -> int:
    """Run trials until the budget is spent (or `max_trials` ran here); return the worker's exit code.
    `guard` hears SIGTERM/SIGINT while the loop runs (give the same guard to the objective's training)."""
    guard = guard or SignalGuard()
    ran = failures_in_a_row = 0
    reaper = Reaper(study, spec.heartbeat_interval, spec.grace_period, spec.max_retries)
    proxied = reaper.proxied  # behind a storage proxy only the proxy's reaper adds retries (it holds the lock)
    try:
        with guard.installed(), reaper, optimize_loop(study):
            while guard.signum is None and (max_trials is None or ran < max_trials):
                trial = next_trial(study, spec)
                if trial is None:
                    unfinished = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
                    if not unfinished and proxied and missing_retries(study, spec.max_retries):
                        log.info("waiting for the storage proxy's reaper to queue a retry")
                        guard.event.wait(spec.heartbeat_interval)
                        continue
                    if not unfinished and not proxied and repair_missing_retries(study, spec.max_retries):
                        continue  # a retry was missing (its reaper died between two writes): run it
                    if not unfinished:
                        log.info("the study's budget of %d trials (or its grid) is spent and no trial is left "
                                 "to run", spec.n_trials)
                        if checkpoints is not None:
                            remove_finished_checkpoints(study, checkpoints, spec.max_retries)
                        break
                    log.info("budget spent; waiting for running trials %s", [t.number for t in unfinished])
                    guard.event.wait(spec.heartbeat_interval)
                    continue
                ran += 1
                outcome = run_trial(study, trial, objective, guard, spec, reaper, checkpoints)
                failures_in_a_row = failures_in_a_row + 1 if outcome == "error" else 0
                if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    log.error("%d trials in a row failed with errors: stopping this worker", failures_in_a_row)
                    return 1
    except WorkerStopped:
        pass  # a second signal, outside a trial
    if guard.signum is not None:
        log.warning("stopped by %s", signal.Signals(guard.signum).name)
        return 128 + guard.signum
    return 0


def run_trial(study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float],
              guard: SignalGuard, spec: StudySpec, reaper: Reaper, checkpoints: CheckpointFiles | None = None) -> str:
    """One trial, told to the storage whatever happens. Returns complete/pruned/interrupted/oom/error;
    an interrupted trial (a signal, the database out of reach) is failed and re-queued."""
    value, state, outcome, reason = None, TrialState.FAIL, "error", ""
    started = time.monotonic()
    try:
        with reaper.beating(trial_id(trial)):  # from the start: a claim held up by an outage is not a death
            claim(study, trial)
            guard.check()
            value = objective(trial)
        state, outcome = TrialState.COMPLETE, "complete"
    except optuna.TrialPruned as exc:
        state, outcome = TrialState.PRUNED, "pruned"
        log.info("trial %d pruned: %s", trial.number, exc)
    except WorkerStopped as exc:
        outcome, reason = "interrupted", str(exc)
    except storage.DB_UNREACHABLE as exc:  # an outage longer than the storage's patience is not the trial's fault
        outcome, reason = "interrupted", f"database unreachable: {str(exc).splitlines()[0][:200]}"
        log.warning("trial %d: %s", trial.number, reason)
    except Exception as exc:  # noqa: BLE001 - a failed trial is data; the worker goes on
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(exc, torch.OutOfMemoryError):
            outcome, reason = "oom", f"CUDA out of memory: {str(exc).splitlines()[0]}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
    finally:
        guard.on_stop = None
        gc.collect()  # drop the dead trial's tensors before the next one allocates
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    frozen = stored_trial(study, trial)
    if outcome == "interrupted":
        why = f"trial {trial.number}: {reason}"
        if fail_for_retry(study, frozen, reason):
            if reaper.proxied:  # behind a proxy its reaper adds the retry, under the database's lock
                log.warning("%s; failed for a retry, which the storage proxy's reaper queues", why)
            else:
                requeue(study, stored_trial(study, trial), spec.max_retries, why)
        return outcome
    try:
        if reason:
            trial.set_user_attr("fail_reason", reason)
        study.tell(trial, value, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was finished by another process (reaped?)", trial.number)
        return outcome
    except ValueError as exc:  # "Cannot tell a COMPLETE trial": a tell whose commit went through before an outage
        told = stored_trial(study, trial)
        if not told.state.is_finished():
            raise
        log.warning("trial %d was already told (%s; a retried write had gone through): %s", trial.number,
                    told.state.name, exc)
        if told.state != state:
            return outcome  # finished otherwise (reaped): not ours to clean up
    if reason:
        log.warning("trial %d failed: %s", trial.number, reason)
    log.info("%s", trial_line(study, trial.number, state, value, frozen.params, time.monotonic() - started,
                              spec.n_trials, lambda t: not is_retry(t) and SURPLUS not in t.system_attrs))
    if checkpoints is not None:  # the result is stored: its checkpoints are no longer needed
        checkpoints.remove_lineage(lineage(study_id(study), frozen))
    return outcome


def remove_finished_checkpoints(study: optuna.Study, checkpoints: CheckpointFiles, max_retries: int) -> list[str]:
    """Remove the checkpoints of this study's finished lineages (left by a worker killed after its result)."""
    trials = study.get_trials(deepcopy=False)
    mine = f"s{study_id(study)}_"
    removed = []
    for name in {lineage_of(file) for file in checkpoints.ids()}:
        if name and name.startswith(mine) and lineage_done(study_id(study), trials, name, max_retries):
            removed += checkpoints.remove_lineage(name)
    if removed:
        log.info("removed %d checkpoint file(s) of finished trials", len(removed))
    return removed
