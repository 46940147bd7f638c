"""The seam between this project and Optuna's internals: no module outside `storage/` names a private part of
Optuna; they ask here. An Optuna upgrade that moves one of them is mended in this file.

Two things live here:
* `RetryingStorage`: the storage a worker runs on. Every call waits out a database outage (retried with
  back-off for up to `patience_s`), here, once, instead of at each call site. A thread that must not wait
  (the reaper, which judges staleness by the clock) runs its calls inside `fail_fast(study)`.
* What the runner needs beyond Optuna's public API: a trial's and a study's storage ids, attributes of a
  finished trial, the conditional RUNNING -> FAIL write, heartbeats and stale trials.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from datetime import datetime
from typing import Any, Callable, Iterator

import optuna
from optuna.storages import BaseStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("pcvit.storage")
DB_PATIENCE_S = 600  # how long a worker keeps retrying through a database outage (a restart takes seconds)
RETRY_WAIT_MAX_S = 3.0  # the longest pause between tries: below a study's grace period, so that a trial a worker
#                         asked for just before an outage is claimed before the reapers judge it unclaimed


def _db_unreachable_errors() -> tuple[type[Exception], ...]:
    import sqlalchemy

    try:  # through a storage proxy: the client turns NOT_FOUND, ALREADY_EXISTS and FAILED_PRECONDITION into
        import grpc  # KeyError, DuplicatedStudyError, UpdateFinishedTrialError; an RpcError left is UNAVAILABLE (no
        proxy_errors: tuple[type[Exception], ...] = (grpc.RpcError,)  # proxy), UNKNOWN (its database) or a deadline
    except ImportError:
        proxy_errors = ()
    return (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
            *proxy_errors)


DB_UNREACHABLE = _db_unreachable_errors()  # what a call raises while the database (or its proxy) is out of reach


def retried(call: Callable[..., Any], *args: Any, patience_s: float = DB_PATIENCE_S, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, retried with back-off while the database is unreachable.

    Optuna turns connection errors into StorageInternalError; SQLAlchemy's OperationalError can also
    escape. pool_pre_ping (see storage.postgres) gives the next try a fresh connection.
    """
    deadline, wait, logged = time.monotonic() + patience_s, 0.5, -math.inf
    while True:
        try:
            return call(*args, **kwargs)
        except DB_UNREACHABLE as exc:
            if time.monotonic() + wait > deadline:
                raise
            if time.monotonic() - logged >= 30:  # one line per half minute of outage, not one per try
                log.warning("database unreachable (%s); retrying every %g s or less", str(exc).splitlines()[0][:200],
                            RETRY_WAIT_MAX_S)
                logged = time.monotonic()
            time.sleep(wait)
            wait = min(wait * 1.5, RETRY_WAIT_MAX_S)  # short: a worker is back within seconds of the database


# --- the retrying storage --------------------------------------------------------------------------------
_HEARTBEAT_METHODS = tuple(name for name in dir(BaseHeartbeat) if not name.startswith("__") and name != "_abc_impl")
_STORAGE_METHODS = tuple(name for name in dir(BaseStorage) if not name.startswith("_")) + _HEARTBEAT_METHODS


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: "RetryingStorage", *args: Any, **kwargs: Any) -> Any:
        call = getattr(self.inner, name)
        if self._fail_fast.active:
            return call(*args, **kwargs)
        return retried(call, *args, patience_s=self.patience_s, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


def _heartbeat_interval(self: "RetryingStorage") -> int | None:
    return self.inner.get_heartbeat_interval() if isinstance(self.inner, BaseHeartbeat) else None


def _no_callback(self: "RetryingStorage") -> Any:
    return None  # the runner retries failed trials itself (studies.running.retries), never through Optuna


class _ThreadFlag(threading.local):
    active = False  # per thread: set by `fail_fast`


def _init(self: "RetryingStorage", inner: BaseStorage, patience_s: float = DB_PATIENCE_S) -> None:
    self.inner, self.patience_s, self._fail_fast = inner, patience_s, _ThreadFlag()


RetryingStorage = type("RetryingStorage", (BaseStorage, BaseHeartbeat), {
    "__doc__": "An Optuna storage whose every call is retried through a database outage (see `retried`).",
    "__init__": _init,
    **{name: _delegate(name) for name in _STORAGE_METHODS},
    "get_heartbeat_interval": _heartbeat_interval,
    **{name: _no_callback for name in _HEARTBEAT_METHODS if name.endswith("_callback")},
})


def retrying(storage: BaseStorage, patience_s: float = DB_PATIENCE_S) -> BaseStorage:
    """`storage` wrapped so that its calls wait out an outage; an RDB storage gets Optuna's cache as well."""
    if isinstance(storage, optuna.storages.RDBStorage):
        storage = _CachedStorage(storage)  # what optuna.load_study would have wrapped it in
    return RetryingStorage(storage, patience_s)


@contextlib.contextmanager
def fail_fast(study: optuna.Study) -> Iterator[None]:
    """Inside the block, this thread's calls on `study` raise at once when the database is out of reach."""
    storage = study._storage
    flag = getattr(storage, "_fail_fast", None)
    if flag is None:
        yield
        return
    flag.active = True
    try:
        yield
    finally:
        flag.active = False


@contextlib.contextmanager
def optimize_loop(study: optuna.Study) -> Iterator[None]:
    """Run our own ask/tell loop as `Study.optimize` runs its: `ask` does not warn that heartbeats need
    `optimize`, and a grid sampler's `Study.stop()` after its last point sets a flag (which nobody reads:
    our loop asks the grid itself) instead of raising from `tell`."""
    local = study._thread_local
    before, local.in_optimize_loop = local.in_optimize_loop, True
    try:
        yield
    finally:
        local.in_optimize_loop = before


def backend_of(storage: Any) -> Any:
    """The RDBStorage or JournalStorage behind `storage` (under the retries and Optuna's cache)."""
    if isinstance(storage, RetryingStorage):
        storage = storage.inner
    return storage._backend if isinstance(storage, _CachedStorage) else storage


def backend_of_study(study: optuna.Study) -> Any:
    return backend_of(study._storage)


def use_heartbeats(study: optuna.Study, interval: int, grace_period: int) -> None:
    """Heartbeats every `interval` s for the study's RDB storage, once its study file has said how often (the
    storage was opened before the file was read from it). A journal file has none."""
    backend = backend_of_study(study)
    if isinstance(backend, optuna.storages.RDBStorage):
        backend.heartbeat_interval, backend.grace_period = interval, grace_period


# --- ids and attributes ------------------------------------------------------------------------------------
def study_id(study: optuna.Study) -> int:
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def stored_trial(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """The trial as the storage has it now."""
    return study._storage.get_trial(trial._trial_id)


def set_system_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: Any) -> None:
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes (Optuna keeps them private since 3.1)."""
    return study._storage.get_study_system_attrs(study._study_id)


def set_user_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: Any) -> None:
    """Also for a FrozenTrial (which has no setter of its own); raises UpdateFinishedTrialError when finished."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def fail_if_running(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> bool:
    """RUNNING -> FAIL in one conditional write; True only for the one caller that changed it.

    Optuna's `set_trial_state_values` reads then writes, and on SQLite (no row locks) two processes
    can both read RUNNING and both "win"; an UPDATE ... WHERE state = RUNNING cannot."""
    storage, backend = study._storage, backend_of_study(study)
    engine = getattr(backend, "engine", None)
    if engine is None:  # journal: its log orders writes, and a later FAIL of a finished trial raises
        try:
            return storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
    from optuna.storages._rdb import models

    table = models.TrialModel.__table__

    def update() -> int:
        with engine.begin() as conn:
            return conn.execute(
                table.update()
                .where(table.c.trial_id == trial._trial_id, table.c.state == TrialState.RUNNING)
                .values(state=TrialState.FAIL, datetime_complete=datetime.now())  # naive local time, as Optuna
            ).rowcount

    flag = getattr(storage, "_fail_fast", None)
    if not isinstance(storage, RetryingStorage) or flag.active:
        return update() == 1
    return retried(update, patience_s=storage.patience_s) == 1


# --- the gRPC storage proxy's client ------------------------------------------------------------------------
def proxy_client_class(max_backoff_ms: int) -> type:
    """Optuna's GrpcStorageProxy with a channel that reconnects within `max_backoff_ms` of a restarted proxy
    (gRPC's default backoff grows to 120 s: a restarted proxy would sit unused for minutes)."""
    from optuna.storages import GrpcStorageProxy
    from optuna.storages._grpc.client import GrpcClientCache

    class ProxyStorage(GrpcStorageProxy):
        def _setup(self) -> None:
            import grpc
            from optuna.storages._grpc.auto_generated import api_pb2_grpc

            self._channel = grpc.insecure_channel(f"{self._host}:{self._port}", options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.initial_reconnect_backoff_ms", 500),
                ("grpc.min_reconnect_backoff_ms", 500),
                ("grpc.max_reconnect_backoff_ms", max_backoff_ms),
            ])
            self._stub = api_pb2_grpc.StorageServiceStub(self._channel)
            self._cache = GrpcClientCache(self._stub)

    return ProxyStorage


# --- heartbeats ------------------------------------------------------------------------------------------
def has_heartbeats(study: optuna.Study) -> bool:
    return bool(getattr(study._storage, "get_heartbeat_interval", lambda: None)())


def record_heartbeat(study: optuna.Study, trial_id_: int) -> None:
    study._storage.record_heartbeat(trial_id_)


def is_proxied(study: optuna.Study) -> bool:
    """True when the study's storage is a gRPC storage proxy (no heartbeat table, no locks)."""
    from optuna.storages import GrpcStorageProxy

    return isinstance(backend_of_study(study), GrpcStorageProxy)


def record_attribute_beat(study: optuna.Study, trial_id_: int, key: str, count: int) -> None:
    """A heartbeat behind a proxy: the trial's system attribute `key` raised to `count`."""
    study._storage.set_trial_system_attr(trial_id_, key, count)


def stale_trial_ids(study: optuna.Study) -> set[int]:
    """Optuna's own judgement: RUNNING trials whose last heartbeat is older than the grace period."""
    return set(study._storage._get_stale_trial_ids(study._study_id))


def heartbeats(study: optuna.Study) -> dict[int, Any]:
    """{trial id: last heartbeat (None if never)} of the study's RUNNING trials, in one query."""
    import sqlalchemy
    from optuna.storages._rdb import models

    engine = backend_of_study(study).engine
    trials, beats = models.TrialModel.__table__, models.TrialHeartbeatModel.__table__
    query = (sqlalchemy.select(trials.c.trial_id, beats.c.heartbeat)
             .select_from(trials.outerjoin(beats, beats.c.trial_id == trials.c.trial_id))
             .where(trials.c.study_id == study._study_id, trials.c.state == TrialState.RUNNING))
    with engine.connect() as conn:
        return {tid: beat for tid, beat in conn.execute(query)}
