"""No zombie trials: a thread in every worker beats for its own trial and re-queues the trials of dead workers.

A trial whose worker dies (SIGKILL, OOM killer, node loss) stays RUNNING in the storage. Every worker runs
a `Reaper` thread for its whole life, so a dead trial is re-queued within the grace period even while all
workers are busy training. A RUNNING trial is reaped when
* its owner (see `studies.running.owners`) is a process on this machine that is gone: at once; or
* its heartbeat (SQLite, PostgreSQL) has not changed for `grace_period` seconds that this reaper itself
  watched with the database reachable. After an outage every clock starts again, so an outage longer
  than the grace period reaps nothing that is alive. A trial that is alive on this machine is never reaped.
The journal file has no heartbeat: there, only owners on this machine are judged (and unclaimed trials).
Behind a gRPC storage proxy there is no heartbeat table either: a worker beats by raising the trial's
`pcvit:heartbeat` attribute, and only the proxy's process (`studies.running.proxy_reaper`, which has the
database's locks) reaps, from those attributes; the workers' threads only beat.
Reaping fails the trial and queues exactly one retry (`studies.running.retries`); the thread also repairs a
FAIL trial whose retry went missing. `reap_once` without a watch (`pcvit-study reap`) trusts the
database's clock instead, as Optuna does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from storage.optuna_access import (fail_fast, has_heartbeats, heartbeats, is_proxied, record_attribute_beat,
                                   record_heartbeat, stale_trial_ids, stored_trial, trial_id)
from studies.running.owners import OWNER, owner_is_alive, owner_is_dead
from studies.running.retries import fail_for_retry, repair_missing_retries, requeue

log = logging.getLogger("pcvit.reaper")
HEARTBEAT = "pcvit:heartbeat"  # trial system attr: a count a worker behind a storage proxy raises every interval


class StalenessWatch:
    """Heartbeat values seen unchanged for longer than `grace_period` seconds of observed, reachable time."""

    def __init__(self, grace_period: float):
        self.grace_period = grace_period
        self.seen: dict[int, tuple[Any, float]] = {}  # trial id -> (heartbeat value, monotonic time first seen)

    def forget(self) -> None:
        """The database could not be read: what happened meanwhile is unknown, so every clock restarts."""
        self.seen.clear()

    def stale(self, beats: dict[int, Any], now: float | None = None) -> set[int]:
        now = time.monotonic() if now is None else now
        seen = {}
        for tid, beat in beats.items():
            earlier = self.seen.get(tid)
            seen[tid] = earlier if earlier is not None and earlier[0] == beat else (beat, now)
        self.seen = seen
        return {trial_id for trial_id, (_, since) in seen.items() if now - since > self.grace_period}


def reap_once(study: optuna.Study, grace_period: float, max_retries: int,
              watch: StalenessWatch | None = None, attribute_beats: bool = False) -> list[int]:
    """Fail and re-queue the RUNNING trials whose worker is gone; return the numbers this call reaped.

    `attribute_beats` (with a watch): judge heartbeats by the trials' HEARTBEAT attribute (workers behind a
    storage proxy) instead of Optuna's heartbeat table."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    beating = has_heartbeats(study) or (attribute_beats and watch is not None)
    if attribute_beats and watch is not None:
        stale = watch.stale({trial_id(t): t.system_attrs.get(HEARTBEAT) for t in running})
    elif beating and watch is not None:
        stale = watch.stale(heartbeats(study))
    elif beating:
        stale = stale_trial_ids(study)
    else:  # journal: an unclaimed trial is judged by the time since it started
        now = time.time()
        stale = {trial_id(t) for t in running
                 if t.datetime_start and now - t.datetime_start.timestamp() > grace_period}
    reaped = []
    for trial in running:
        reason = dead_reason(trial, trial_id(trial) in stale, beating, grace_period)
        if reason and fail_for_retry(study, trial, reason):
            requeue(study, stored_trial(study, trial), max_retries, reason)
            reaped.append(trial.number)
    repair_missing_retries(study, max_retries)
    return reaped


def dead_reason(trial: FrozenTrial, stale: bool, beating: bool, grace_period: float) -> str | None:
    """Why `trial` counts as dead, or None when it may be alive."""
    owner = trial.system_attrs.get(OWNER)
    if owner is not None and owner_is_alive(owner):
        return None
    if owner is not None and owner_is_dead(owner):
        return f"trial {trial.number}: its worker process ({trial.user_attrs.get('worker')}) is gone"
    if not stale:
        return None
    if owner is None:
        return f"trial {trial.number}: never claimed by a worker within {grace_period:g} s"
    if beating:
        return f"trial {trial.number}: its worker stopped sending heartbeats ({grace_period:g} s)"
    return None  # journal, another machine: nothing can tell


class Reaper:
    """The worker's background thread: every heartbeat interval, beat for the trial it runs, then reap
    (behind a storage proxy: only beat, through the trial's HEARTBEAT attribute)."""

    def __init__(self, study: optuna.Study, interval: float, grace_period: float, max_retries: int):
        self.study, self.interval, self.max_retries = study, interval, max_retries
        self.watch = StalenessWatch(grace_period)
        self.proxied = is_proxied(study)
        self.beats = 0
        self.trial_id: int | None = None
        self.reaped: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._outage = False

    def __enter__(self) -> "Reaper":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def beating(self, trial_id: int) -> Iterator[None]:
        """Beat for `trial_id` while the block runs (a first beat at once)."""
        self.trial_id = trial_id
        self._beat()
        try:
            yield
        finally:
            self.trial_id = None

    def _beat(self) -> None:
        beating_for = self.trial_id
        if beating_for is None or not (self.proxied or has_heartbeats(self.study)):
            return
        try:
            with fail_fast(self.study):  # a beat that waits out an outage would arrive late anyway
                if self.proxied:
                    self.beats += 1
                    record_attribute_beat(self.study, beating_for, HEARTBEAT, self.beats)
                else:
                    record_heartbeat(self.study, beating_for)
            if self.proxied and self._outage:
                log.warning("storage proxy reachable again")
                self._outage = False
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # finished (told, or reaped) between the check and the beat
        except Exception as exc:  # noqa: BLE001 - keep beating through a database restart
            self._unreachable(f"heartbeat of trial id {beating_for}", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()
            if self.proxied:
                continue  # the proxy's process reaps: it alone holds the locks a retry needs
            try:
                with fail_fast(self.study):  # staleness is judged by the clock: never judge after a wait
                    reaped = reap_once(self.study, self.watch.grace_period, self.max_retries, self.watch)
            except Exception as exc:  # noqa: BLE001 - an outage: judge nothing until it is over
                self._unreachable("reaping", exc)
                continue
            if self._outage:
                log.warning("database reachable again; staleness is measured from now on")
                self._outage = False
            if reaped:
                log.warning("reaped dead trials %s", reaped)
                self.reaped += reaped

    def _unreachable(self, what: str, exc: Exception) -> None:
        self.watch.forget()
        if not self._outage:
            log.warning("%s failed, database unreachable? (%s: %s); retrying every %g s", what,
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "", self.interval)
        self._outage = True
