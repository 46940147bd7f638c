"""Where study data lives: the storage URL, the Optuna storage behind it, and the artifact store.

URL forms (the same as Optuna's where Optuna has one):
* `sqlite:///storage/pcvit.db` (relative; `sqlite:////abs/path.db` absolute): one worker, the default.
* `storage/journal.log` (a plain file path; also `journal:///storage/journal.log`, `journal:////abs/path`):
  Optuna's journal file, for several workers on one machine without a database server. The plain path is
  what `optuna` (through `OPTUNA_STORAGE` too) and `optuna-dashboard` read as a journal file.
* `postgresql+psycopg2://user@host:5432/db` (password from `PGPASSWORD` or `~/.pgpass`, never the repo):
  many workers on many machines.
The URL comes from the command line, else `OPTUNA_STORAGE` (what Optuna's own CLI reads), else the default.
Artifacts (images, metrics, weights; checkpoints, see `storage.checkpoints`) go to a file-system store:
`--artifact-dir`, else `PCVIT_ARTIFACT_DIR`, else `storage/artifacts`; point `optuna-dashboard --artifact-dir`
at the same folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import random
import time
import warnings
from typing import Any, Callable

import optuna
from optuna.artifacts import FileSystemArtifactStore

from storage.locks import LOCK_SUFFIX, file_lock
from storage.postgres import (StorageError, StorageUnreachable, check_connection_budget, engine_kwargs, is_postgres_url,
                              mask_password, storage_error)

DEFAULT_URL = "sqlite:///storage/pcvit.db"
DEFAULT_ARTIFACT_DIR = "storage/artifacts"
URL_ENV = "OPTUNA_STORAGE"
ARTIFACT_DIR_ENV = "PCVIT_ARTIFACT_DIR"
log = logging.getLogger("pcvit.storage")
SCHEMA_RACE_ATTEMPTS = 5
SQLITE_BUSY_TIMEOUT_S = 60  # workers, `reap` and the dashboard share one file: wait for its lock, do not fail

__all__ = [
    "ARTIFACT_DIR_ENV", "DEFAULT_ARTIFACT_DIR", "DEFAULT_URL", "StorageError", "StorageUnreachable", "URL_ENV",
    "artifact_folder", "artifact_store", "is_journal", "journal_path", "local_file", "mask_password", "open_storage",
    "require_existing", "resolve_url", "retry_db", "wait_for_storage",
]
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def resolve_url(url: str | None = None) -> str:
    """The storage URL to use: the argument, else $OPTUNA_STORAGE, else the SQLite file under storage/."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


def is_journal(url: str) -> bool:
    """`journal:///PATH`, or a plain file path (no scheme), which is how Optuna's CLI names a journal file."""
    return url.startswith("journal://") or "://" not in url


def journal_path(url: str) -> pathlib.Path:
    """`journal:///rel/path` -> rel/path, `journal:////abs/path` -> /abs/path (as SQLAlchemy reads sqlite:///)."""
    return pathlib.Path(url[len("journal:///"):] if url.startswith("journal://") else url)


def local_file(url: str) -> pathlib.Path | None:
    """The file behind a SQLite or journal URL; None for a database server."""
    if is_journal(url):
        return journal_path(url)
    if url.startswith("sqlite:///"):
        return pathlib.Path(url[len("sqlite:///"):])
    return None


def require_existing(url: str) -> None:
    """For commands that only read: refuse (StorageError) a storage file that does not exist, instead of creating it."""
    path = local_file(url)
    if path is not None and str(path) and not path.is_file():
        raise StorageError(f"{mask_password(url)}: no such storage file {path} (this command only reads, so it "
                           "creates none; check the path: three slashes mean a relative path, four an absolute one)")


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    check_budget: bool = False,
) -> optuna.storages.BaseStorage:
    """Open the Optuna storage behind `url`; raise StorageError naming the URL when it cannot be used.

    RDB storages (SQLite, PostgreSQL) get heartbeats every `heartbeat_interval` seconds; what counts as
    dead, and what happens to it, is the runner's business (`studies.reaper`). The journal file has no
    heartbeat. With `check_budget`, a PostgreSQL server must have a free connection budget for one more
    worker. Workers that open a new SQLite file together create its tables one at a time.
    """
    shown = mask_password(url)
    if is_journal(url):
        path = journal_path(url)
        if "://" not in url and path.suffix in SQLITE_SUFFIXES:
            raise StorageError(f"{url}: not a storage URL this runner knows; a SQLite file is sqlite:///{url} "
                               "(a plain path is read as an Optuna journal file)")
        _need_folder(path, url)
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "sqlite":
        if url in ("sqlite://", "sqlite:///:memory:"):
            raise StorageError(f"{url}: an in-memory database cannot be shared with workers or the dashboard")
        _need_folder(pathlib.Path(url[len("sqlite:///"):]), url)
        options: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    elif is_postgres_url(url):
        if check_budget:
            check_connection_budget(url, 1, dashboards=0)
        options = engine_kwargs()
    elif scheme.split("+")[0] == "mysql":
        options = {"pool_pre_ping": True}
    else:
        raise StorageError(f"{shown}: not a storage URL this runner knows; use sqlite:///PATH, "
                           "journal:///PATH or postgresql+psycopg2://USER@HOST:PORT/DB")
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


def _need_folder(path: pathlib.Path, url: str) -> None:
    folder = path.parent
    if not str(path) or path.is_dir():
        raise StorageError(f"{url}: needs a file path after the scheme (e.g. {url.rstrip('/')}/pcvit.db)")
    if not folder.is_dir():
        raise StorageError(f"{url}: the folder {folder}/ does not exist (create it, or fix the path; "
                           "note that three slashes mean a relative path and four an absolute one)")


DB_PATIENCE_S = 600  # how long a worker keeps retrying through a database outage (a restart takes seconds)
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


def _db_unreachable_errors() -> tuple[type[Exception], ...]:
    import sqlalchemy

    return optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError


DB_UNREACHABLE = _db_unreachable_errors()  # what a call raises while the database is out of reach


def retry_db(call: Callable[..., Any], *args: Any, patience_s: float = DB_PATIENCE_S, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, retried with back-off while the database is unreachable.

    Optuna turns connection errors into StorageInternalError; SQLAlchemy's OperationalError can also
    escape. pool_pre_ping (see storage.postgres) gives the next try a fresh connection.
    """
    deadline, wait = time.monotonic() + patience_s, 1.0
    while True:
        try:
            return call(*args, **kwargs)
        except DB_UNREACHABLE as exc:
            if time.monotonic() + wait > deadline:
                raise
            log.warning("database unreachable (%s); retrying in %.0f s", str(exc).splitlines()[0][:200], wait)
            time.sleep(wait)
            wait = min(wait * 2, 30.0)


def artifact_folder(path: str | None = None) -> pathlib.Path:
    """The artifact folder: `path`, else $PCVIT_ARTIFACT_DIR, else storage/artifacts (created)."""
    folder = pathlib.Path(path or os.environ.get(ARTIFACT_DIR_ENV) or DEFAULT_ARTIFACT_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def artifact_store(path: str | None = None) -> FileSystemArtifactStore:
    """The file-system artifact store in `artifact_folder(path)` (images, metrics, weights)."""
    return FileSystemArtifactStore(str(artifact_folder(path)))
