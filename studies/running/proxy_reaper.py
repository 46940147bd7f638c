"""The reaper that runs beside a gRPC storage proxy, in its process, with direct database access.

Behind a proxy, workers cannot reach Optuna's heartbeat table or the database's locks, so they only beat
(a count in each running trial's `pcvit:heartbeat` attribute, see `studies.running.reaper`) and fail a trial they
stop; they add no retries. This thread does the rest for every pcvit study in the database: it judges the
heartbeats it watches change (its own clock, as the workers' reapers do), fails and re-queues dead trials,
and queues the retry of every trial a worker failed for one, all under the same PostgreSQL advisory lock
as direct workers use, so each trial gets exactly one retry.

It also raises the study's `pcvit:proxy_reaper` mark every few seconds: a worker that joins through a
proxy waits for that mark to move and refuses to run without it (a plain `run_grpc_proxy_server` has no
reaper: a dead worker's trial would stay RUNNING and a stopped one would never be retried).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import optuna

from storage import StorageError, mask_password
from storage.optuna_access import study_id, study_system_attrs
from studies.running.reaper import StalenessWatch, reap_once
from studies.studyfile.spec import StudyFileError, stored_spec

log = logging.getLogger("pcvit.proxy")
MARK = "pcvit:proxy_reaper"  # study system attr: {"by": host:pid, "count": n}, raised every MARK_EVERY_S
MARK_EVERY_S = 2.0
MARK_PATIENCE_S = 15.0  # how long a joining worker waits to see the mark move


class ProxyReaper:
    """Every MARK_EVERY_S: mark each pcvit study, and reap it when its heartbeat interval has passed."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage  # direct RDBStorage (not the proxy): locks and conditional writes work
        self.watches: dict[int, StalenessWatch] = {}
        self.specs: dict[int, Any] = {}  # study id -> its stored study file, checked once (it never changes)
        self.last_reap: dict[int, float] = {}
        self.count = 0
        self.reaped: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="proxy-reaper", daemon=True)
        self._outage = False

    def start(self) -> "ProxyReaper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def run(self) -> None:
        while not self._stop.wait(MARK_EVERY_S):
            try:
                self.round(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - the database is out of reach: judge nothing until it is back
                for watch in self.watches.values():
                    watch.forget()
                if not self._outage:
                    log.warning("reaping failed, database unreachable? (%s: %s)", type(exc).__name__,
                                str(exc).splitlines()[0][:200] if str(exc) else "")
                self._outage = True
            else:
                if self._outage:
                    log.warning("database reachable again; staleness is measured from now on")
                self._outage = False

    def round(self, now: float) -> None:
        self.count += 1
        mark = {"by": f"{socket.gethostname()}:{os.getpid()}", "count": self.count}
        for frozen in self.storage.get_all_studies():
            study = optuna.load_study(study_name=frozen.study_name, storage=self.storage)
            sid = study_id(study)
            if sid not in self.specs:  # a study's file is checked once, not every round
                try:
                    self.specs[sid] = stored_spec(study, f"study {frozen.study_name!r}")
                except StudyFileError as exc:
                    log.warning("%s", exc)
                    continue
            spec = self.specs[sid]
            if spec is None:
                self.specs.pop(sid)  # not a pcvit study, or no worker has joined it yet: look again next round
                continue
            self.storage.set_study_system_attr(sid, MARK, mark)
            if now - self.last_reap.get(sid, -float("inf")) < spec.heartbeat_interval:
                continue
            self.last_reap[sid] = now
            watch = self.watches.setdefault(sid, StalenessWatch(spec.grace_period))
            reaped = reap_once(study, spec.grace_period, spec.max_retries, watch, attribute_beats=True)
            if reaped:
                log.warning("study %r: reaped dead trials %s", frozen.study_name, reaped)
                self.reaped += [(frozen.study_name, number) for number in reaped]


def wait_for_proxy_reaper(study: optuna.Study, url: str, patience_s: float = MARK_PATIENCE_S) -> None:
    """Return once the study's MARK moves (a pcvit reaper runs beside the proxy); StorageError, one line, if not."""
    def mark() -> Any:
        return study_system_attrs(study).get(MARK)

    first, deadline = mark(), time.monotonic() + patience_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if mark() != first:
            return
    raise StorageError(f"{mask_password(url)}: no pcvit reaper beside this storage proxy (the study's {MARK} mark "
                       f"did not move in {patience_s:g} s); start the proxy with `pcvit-study proxy`, not Optuna's "
                       "run_grpc_proxy_server: without it a dead worker's trial is never retried")
