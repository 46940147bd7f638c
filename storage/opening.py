"""Opening the Optuna storage behind a URL: SQLite, PostgreSQL, a journal file; waiting for a server that is
starting; creating Optuna's tables once when several workers start together."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import random
import time
import warnings
from typing import Any

import optuna

from storage.locks import LOCK_SUFFIX, file_lock
from storage.postgres import (StorageError, StorageUnreachable, check_connection_budget, engine_kwargs, is_postgres_url,
                              mask_password, storage_error)
from storage.proxy import is_proxy_url, open_proxy
from storage.urls import SQLITE_SUFFIXES, check_url_form, is_journal, journal_path, need_folder

log = logging.getLogger("pcvit.storage")
SCHEMA_RACE_ATTEMPTS = 5
SQLITE_BUSY_TIMEOUT_S = 60  # workers, `reap` and the dashboard share one file: wait for its lock, do not fail


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    check_budget: bool = False,
    connections: int | None = None,
) -> optuna.storages.BaseStorage:
    """Open the Optuna storage behind `url`; raise StorageError naming the URL when it cannot be used.

    RDB storages (SQLite, PostgreSQL) get heartbeats every `heartbeat_interval` seconds; what counts as
    dead, and what happens to it, is the runner's business (`studies.running.reaper`). The journal file has no
    heartbeat. With `check_budget`, a PostgreSQL server must have a free connection budget for one more
    worker. Workers that open a new SQLite file together create its tables one at a time. `connections`:
    a PostgreSQL pool of exactly that many (the storage proxy's), instead of a worker's. A `grpc://` storage
    proxy has no heartbeat table: a worker beats through a trial attribute (studies.running.reaper).
    """
    shown = mask_password(url)
    check_url_form(url)
    if is_proxy_url(url):
        return open_proxy(url)
    if is_journal(url):
        path = journal_path(url)
        if "://" not in url and path.suffix in SQLITE_SUFFIXES:
            raise StorageError(f"{url}: not a storage URL this runner knows; a SQLite file is sqlite:///{url} "
                               "(a plain path is read as an Optuna journal file)")
        need_folder(path, url)
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "sqlite":
        if url in ("sqlite://", "sqlite:///:memory:"):
            raise StorageError(f"{url}: an in-memory database cannot be shared with workers or the dashboard")
        need_folder(pathlib.Path(url[len("sqlite:///"):]), url)
        options: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    elif is_postgres_url(url):
        if check_budget:
            check_connection_budget(url, 1, dashboards=0)
        options = engine_kwargs()
        if connections is not None:
            options.update(pool_size=connections, max_overflow=0)
    elif scheme.split("+")[0] == "mysql":
        options = {"pool_pre_ping": True}
    else:
        raise StorageError(f"{shown}: not a storage URL this runner knows; use sqlite:///PATH, "
                           "journal:///PATH, postgresql+psycopg2://USER@HOST:PORT/DB or grpc://HOST:PORT "
                           "(a storage proxy)")
    import sqlalchemy

    heartbeat = {}
    if heartbeat_interval is not None:
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period}
    attempt = 0
    while True:
        attempt += 1
        try:
            with _schema_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=options, **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as exc:
            # Workers started together on an empty PostgreSQL database all create Optuna's tables; the
            # losers' CREATE fails with a duplicate. The tables exist then: try again.
            if "already exists" not in str(exc) and not isinstance(exc, sqlalchemy.exc.IntegrityError):
                raise storage_error(f"{shown}: cannot open the storage", getattr(exc, "orig", None) or exc) from None
            if attempt == SCHEMA_RACE_ATTEMPTS:
                raise StorageError(f"{shown}: cannot create Optuna's tables: {getattr(exc, 'orig', exc)}") from None
            time.sleep(0.2 + random.random())
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, RuntimeError) as exc:  # Runtime: old schema
            raise storage_error(f"{shown}: cannot open the storage", getattr(exc, "orig", None) or exc) from None
        except optuna.exceptions.StorageInternalError as exc:  # Optuna's wrapping of the same: read its cause
            cause = exc.__cause__ or exc
            raise storage_error(f"{shown}: cannot open the storage", getattr(cause, "orig", None) or cause) from None


def _schema_lock(url: str) -> contextlib.AbstractContextManager:
    """SQLite: one process at a time creates (or checks) the tables of a file; others: no lock needed."""
    if url.startswith("sqlite:///"):
        return file_lock(url[len("sqlite:///"):] + LOCK_SUFFIX)
    return contextlib.nullcontext()


STARTUP_PATIENCE_S = 60  # how long a starting worker waits for a server that does not answer


def wait_for_storage(url: str, *args: Any, patience_s: float = STARTUP_PATIENCE_S, **kwargs: Any) -> Any:
    """`open_storage(url, ...)`, retried while the server does not answer (a restart, a compose start-up);
    after `patience_s` the StorageUnreachable goes to the caller. Every other StorageError at once."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return open_storage(url, *args, **kwargs)
        except StorageUnreachable as exc:
            if time.monotonic() + 2 > deadline:
                raise
            log.warning("%s; retrying in 2 s", exc)
            time.sleep(2)
