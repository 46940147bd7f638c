"""Fail a trial whose worker is gone and queue exactly one retry of it, on every storage, whatever crashes.

A retry is a WAITING copy of the failed trial (same params, seed, checkpoint, and the intermediate values up
to that checkpoint), at most `max_retries` per trial. It reuses Optuna's `failed_trial`/`retry_history`
system attributes, so Optuna's own helpers read it. Three rules keep the count exact:
* the trial is marked for a retry (`pcvit:retry_reason`) before it is failed, and failed by a conditional
  write (RUNNING -> FAIL) that only one process can win;
* the retry is added under the storage's `retry` lock, after checking that none exists yet;
* a FAIL trial that is marked but has no retry (its reaper was killed between the two writes) is repaired
  by `repair_missing_retries`, which every worker's reaper runs.
"""

from __future__ import annotations

import json
import logging
import re

import optuna
from optuna.trial import FrozenTrial, TrialState

from storage.locks import storage_lock
from storage.optuna_access import fail_if_running, set_system_attr, set_user_attr
from studies.running.records import PREFIX, SHOWN, record
from studies.studyfile.spec import stored_document

log = logging.getLogger("pcvit.retries")

CHECKPOINT = "checkpoint"  # {"id", "epoch", "trained"}: the latest checkpoint, written in one call (`records`)
INHERITED = ("seed", "sampler_seed", CHECKPOINT)  # kept by a retry
RETRY_REASON = "pcvit:retry_reason"  # system attr: this trial is to be retried, and why


def is_retry(trial: FrozenTrial) -> bool:
    return "retry_history" in trial.system_attrs


def lineage(study_id: int, trial: FrozenTrial) -> str:
    """The chain a trial belongs to (itself and its retries): names its checkpoint files."""
    return f"s{study_id}_t{trial.system_attrs.get('failed_trial', trial.number)}"


def stored_max_retries(study: optuna.Study) -> int:
    document, _ = stored_document(study)
    return int((document or {}).get("max_retries", 0))


def fail_for_retry(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial for a retry and fail it; False if another process finished it first.

    The caller that gets True owns the trial's retry (`requeue`)."""
    try:
        set_system_attr(study, trial, RETRY_REASON, reason)
        set_user_attr(study, trial, "fail_reason", reason)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return fail_if_running(study, trial)


def requeue(study: optuna.Study, failed: FrozenTrial, max_retries: int, reason: str) -> int | None:
    """Queue the retry of `failed` unless it exists; return its retry count, None when none was added."""
    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    if len(history) > max_retries:
        log.warning("%s; not retried: %d retries already (max_retries %d)", reason, len(history) - 1, max_retries)
        return None
    with storage_lock(study, f"retry:{study.study_name}"):
        if retry_of(study, failed.number) is not None:
            return None
        study.add_trial(retry_template(failed, history, reason))
    checkpoint = record(failed).get(CHECKPOINT) or {}
    log.warning("%s; re-queued (retry %d of %d, resuming after epoch %d)", reason, len(history), max_retries,
                checkpoint.get("epoch", 0))
    return len(history)


def retry_of(study: optuna.Study, number: int) -> FrozenTrial | None:
    for trial in study.get_trials(deepcopy=False):
        if trial.system_attrs.get("retry_history", [None])[-1] == number:
            return trial
    return None


def retry_template(failed: FrozenTrial, history: list[int], reason: str) -> FrozenTrial:
    """The WAITING copy of `failed` that resumes from its checkpoint (with the reports and images up to it)."""
    kept = record(failed)
    resume_epoch = (kept.get(CHECKPOINT) or {}).get("epoch", 0)
    inherited = {key: kept[key] for key in INHERITED if key in kept}
    system_attrs = {"failed_trial": history[0], "retry_history": history,
                    **{PREFIX + key: value for key, value in inherited.items() if key not in SHOWN}}
    for key, meta in failed.system_attrs.items():  # keep the images of the epochs the retry will not redo
        if key.startswith("artifacts:"):
            epoch = re.search(r"epoch(\d+)", json.loads(meta).get("filename", ""))
            if epoch and int(epoch.group(1)) <= resume_epoch:
                system_attrs[key] = meta
    return optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=failed.params,
        distributions=failed.distributions,
        user_attrs={**{key: value for key, value in inherited.items() if key in SHOWN}, "retry_reason": reason},
        system_attrs=system_attrs,
        intermediate_values={s: v for s, v in failed.intermediate_values.items() if s <= resume_epoch},
    )


def missing_retries(study: optuna.Study, max_retries: int) -> list[FrozenTrial]:
    """The FAIL trials that were marked for a retry but have none yet."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs["retry_history"][-1] for t in trials if is_retry(t)}
    return [trial for trial in trials
            if trial.state == TrialState.FAIL and RETRY_REASON in trial.system_attrs and trial.number not in retried
            and len(trial.system_attrs.get("retry_history", [])) < max_retries]


def repair_missing_retries(study: optuna.Study, max_retries: int) -> list[int]:
    """Queue the retry of every FAIL trial that was marked for one but has none; return their numbers."""
    repaired = []
    for trial in missing_retries(study, max_retries):
        if requeue(study, trial, max_retries, f"{trial.system_attrs[RETRY_REASON]} (retry repaired)"):
            repaired.append(trial.number)
    return repaired


def lineage_done(study_id: int, trials: list[FrozenTrial], name: str, max_retries: int) -> bool:
    """True when no trial of lineage `name` runs, waits, or still wants its retry: its checkpoints can go."""
    members = [t for t in trials if lineage(study_id, t) == name]
    if not members:
        return True
    retried = {t.system_attrs["retry_history"][-1] for t in members if is_retry(t)}
    for t in members:
        if not t.state.is_finished():
            return False
        wants_retry = RETRY_REASON in t.system_attrs and t.number not in retried
        if t.state == TrialState.FAIL and wants_retry and len(t.system_attrs.get("retry_history", [])) < max_retries:
            return False
    return True
