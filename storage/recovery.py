"""No zombie trials, no lost work: heartbeats, reaping dead trials, re-queueing them with their checkpoint.

A trial whose worker dies (SIGKILL, node loss, OOM killer) stays RUNNING in the storage. Two ways find it:
* heartbeats (SQLite, PostgreSQL): the worker's `Heartbeat` thread touches the trial every
  `heartbeat_interval` s; any process that calls `reap_stale_trials` fails trials silent for `grace_period` s;
* process ids (any storage, immediate): the worker records who runs the trial (host, PID namespace, PID,
  process start time); a process on the same machine fails the trial as soon as that process is gone.
  This is the only way for the journal file, which has no heartbeat.
A failed trial is re-queued (`requeue`) as a WAITING copy with the same params, seed and checkpoint and the
intermediate values up to the checkpoint, at most `max_retries` times. Retries reuse Optuna's
`failed_trial`/`retry_history` system attributes, so Optuna's own helpers can read them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("pcvit.recovery")

OWNER = "pcvit:owner"  # system attr: the machine-checkable identity of the process running the trial
CHECKPOINT_ID = "checkpoint_artifact_id"  # user attrs of the latest checkpoint
CHECKPOINT_EPOCH = "checkpoint_epoch"
INHERITED = ("seed", "sampler_seed", CHECKPOINT_ID, CHECKPOINT_EPOCH)  # user attrs a retry keeps
SPEC_ATTR = "study_spec"  # study user attr holding the validated study file (see studies.spec)


# --- who runs a trial ---------------------------------------------------------------------------------
def process_identity(pid: int | None = None) -> str | None:
    """`host|pid-namespace|pid|start-time` of a live process (None if it is gone); start time and namespace
    are `?` where there is no Linux /proc, and such an owner is only ever judged by its heartbeat."""
    pid = os.getpid() if pid is None else pid
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = f.read().rsplit(")", 1)[1].split()[19]  # field 22, after the command name
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else f"{socket.gethostname()}|?|{pid}|?"
    except OSError:
        return f"{socket.gethostname()}|?|{pid}|?"
    return f"{socket.gethostname()}|{namespace}|{pid}|{start_ticks}"


def owner_is_dead(identity: str) -> bool:
    """True only when `identity` names a process on this machine (same host and PID namespace) that is gone."""
    host, namespace, pid, _ = identity.split("|")
    mine = process_identity()
    if namespace == "?" or mine is None or mine.split("|")[:2] != [host, namespace]:
        return False  # another machine or container, or no /proc: only its heartbeat can tell
    return process_identity(int(pid)) != identity


def claim(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record which worker runs `trial` (for reaping) and where (for people)."""
    study._storage.set_trial_system_attr(trial._trial_id, OWNER, process_identity())
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")


# --- heartbeats ---------------------------------------------------------------------------------------
class Heartbeat:
    """Touch the trial's heartbeat every interval from a thread, surviving database hiccups.

    Optuna's own heartbeat thread dies on the first failed write (a database restart), after which the
    trial is reaped while it still runs; this one logs the error and tries again at the next beat.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeat":
        if self.interval:
            self._beat()
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.trial_id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def _beat(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception as exc:  # noqa: BLE001 - keep beating through a database restart
            log.warning("heartbeat of trial id %s failed (will retry): %s", self.trial_id, exc)


# --- reaping ------------------------------------------------------------------------------------------
def stored_max_retries(study: optuna.Study) -> int:
    return int(study.user_attrs.get(SPEC_ATTR, {}).get("max_retries", 0))


def retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat-stale callback: re-queue the trial that just failed for lack of heartbeats."""
    requeue(study, trial, stored_max_retries(study), f"trial {trial.number}: its worker stopped sending heartbeats")


def reap_stale_trials(study: optuna.Study, grace_period: int) -> list[int]:
    """Fail (and re-queue) every RUNNING trial whose worker is gone; return the numbers of the trials reaped."""
    reaped = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # this machine: at once
        owner = trial.system_attrs.get(OWNER)
        if owner is not None and owner_is_dead(owner):
            reason = f"trial {trial.number}: its worker process ({trial.user_attrs.get('worker')}) is gone"
        elif owner is None and trial.datetime_start and now - trial.datetime_start.timestamp() > grace_period:
            reason = f"trial {trial.number}: never claimed by a worker within {grace_period} s"
        else:
            continue
        if fail_trial(study, trial, reason):
            requeue(study, study._storage.get_trial(trial._trial_id), stored_max_retries(study), reason)
            reaped.append(trial.number)
    storage = study._storage
    if hasattr(storage, "get_heartbeat_interval") and storage.get_heartbeat_interval():  # any machine
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # its callback (retry_stale_trial) re-queues
        still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        reaped += sorted(running - still)
    return reaped


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with `reason`; False if another process finished it first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        return storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def requeue(study: optuna.Study, failed: FrozenTrial, max_retries: int, reason: str) -> int | None:
    """Queue a retry of `failed` that resumes from its checkpoint; None when its retries are used up."""
    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    if len(history) > max_retries:
        log.warning("%s; not retried: %d retries already (max_retries %d)", reason, len(history) - 1, max_retries)
        return None
    resume_epoch = failed.user_attrs.get(CHECKPOINT_EPOCH, 0) if failed.user_attrs.get(CHECKPOINT_ID) else 0
    system_attrs = {"failed_trial": history[0], "retry_history": history}
    for key, meta in failed.system_attrs.items():  # keep the images of the epochs the retry will not redo
        if key.startswith("artifacts:"):
            epoch = re.search(r"epoch(\d+)", json.loads(meta).get("filename", ""))
            if epoch and int(epoch.group(1)) <= resume_epoch:
                system_attrs[key] = meta
    retry = optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=failed.params,
        distributions=failed.distributions,
        user_attrs={**{k: failed.user_attrs[k] for k in INHERITED if k in failed.user_attrs},
                    "retry_reason": reason},
        system_attrs=system_attrs,
        intermediate_values={s: v for s, v in failed.intermediate_values.items() if s <= resume_epoch},
    )
    study.add_trial(retry)
    log.warning("%s; re-queued (retry %d of %d, resuming after epoch %d)", reason, len(history), max_retries,
                resume_epoch)
    return len(history)


def is_retry(trial: FrozenTrial) -> bool:
    return "retry_history" in trial.system_attrs


# --- checkpoints in the artifact store ----------------------------------------------------------------
def save_checkpoint(store: Any, checkpoint: dict[str, Any]) -> str:
    """Write a checkpoint under a new id. It is not a dashboard artifact: it is replaced as the trial goes."""
    import torch

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    artifact_id = f"checkpoint-{uuid.uuid4()}"
    store.write(artifact_id, buffer)
    return artifact_id


def load_checkpoint(store: Any, artifact_id: str) -> dict[str, Any]:
    import torch

    with store.open_reader(artifact_id) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def remove_checkpoint(store: Any, artifact_id: str | None) -> None:
    if artifact_id:
        try:
            store.remove(artifact_id)
        except Exception:  # noqa: BLE001 - already gone (another retry removed it) is fine
            pass
