"""Where study data lives: the storage URL, the Optuna storage behind it, and the artifact store.

URL forms (the same as Optuna's where Optuna has one):
* `sqlite:///storage/pcvit.db` (relative; `sqlite:////abs/path.db` absolute): one worker, the default.
* `storage/journal.log` (a plain file path; also `journal:///storage/journal.log`, `journal:////abs/path`):
  Optuna's journal file, for several workers on one machine without a database server. The plain path is
  what `optuna` (through `OPTUNA_STORAGE` too) and `optuna-dashboard` read as a journal file.
* `postgresql+psycopg2://user@host:5432/db` (password from `PGPASSWORD` or `~/.pgpass`, never the repo):
  many workers on many machines.
The URL comes from the command line, else `OPTUNA_STORAGE` (what Optuna's own CLI reads), else the default.
Artifacts (images, metrics, weights, checkpoints) go to a file-system store: `--artifact-dir`, else
`PCVIT_ARTIFACT_DIR`, else `storage/artifacts`; point `optuna-dashboard --artifact-dir` at the same folder.
"""

from __future__ import annotations

import logging
import os
import pathlib
import random
import time
import warnings
from typing import Any, Callable

import optuna
from optuna.artifacts import FileSystemArtifactStore

from storage.postgres import StorageError, check_connection_budget, engine_kwargs, is_postgres_url, mask_password

DEFAULT_URL = "sqlite:///storage/pcvit.db"
DEFAULT_ARTIFACT_DIR = "storage/artifacts"
URL_ENV = "OPTUNA_STORAGE"
ARTIFACT_DIR_ENV = "PCVIT_ARTIFACT_DIR"
log = logging.getLogger("pcvit.storage")
SCHEMA_RACE_ATTEMPTS = 5
SQLITE_BUSY_TIMEOUT_S = 60  # workers, `reap` and the dashboard share one file: wait for its lock, do not fail

__all__ = [
    "ARTIFACT_DIR_ENV", "DEFAULT_ARTIFACT_DIR", "DEFAULT_URL", "StorageError", "URL_ENV", "artifact_store",
    "is_journal", "journal_path", "local_file", "mask_password", "open_storage", "require_existing", "resolve_url",
    "retry_db",
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
    stale_trial_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    check_budget: bool = False,
) -> optuna.storages.BaseStorage:
    """Open the Optuna storage behind `url`; raise StorageError naming the URL when it cannot be used.

    RDB storages (SQLite, PostgreSQL) get heartbeats: a trial whose worker stops beating for
    `grace_period` seconds is failed by the next worker that looks, and `stale_trial_callback` re-queues it.
    The journal file has no heartbeat; `storage.recovery` finds its dead trials by process id instead.
    With `check_budget`, a PostgreSQL server must have a free connection budget for one more worker.
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
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                     "heartbeat_stale_trial_callback": stale_trial_callback}
    attempt = 0
    while True:
        attempt += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=options, **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Workers started together on an empty database all create Optuna's tables; the losers'
            # CREATE fails with a duplicate. The tables exist then: try again.
            if attempt == SCHEMA_RACE_ATTEMPTS:
                raise StorageError(f"{shown}: cannot create Optuna's tables: {getattr(exc, 'orig', exc)}") from None
            time.sleep(0.2 + random.random())
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, RuntimeError) as exc:  # Runtime: old schema
            reason = getattr(exc, "orig", None) or exc
            raise StorageError(f"{shown}: cannot open the storage: {str(reason).strip()}") from None


def _need_folder(path: pathlib.Path, url: str) -> None:
    folder = path.parent
    if not str(path) or path.is_dir():
        raise StorageError(f"{url}: needs a file path after the scheme (e.g. {url.rstrip('/')}/pcvit.db)")
    if not folder.is_dir():
        raise StorageError(f"{url}: the folder {folder}/ does not exist (create it, or fix the path; "
                           "note that three slashes mean a relative path and four an absolute one)")


DB_PATIENCE_S = 600  # how long a worker keeps retrying through a database outage (a restart takes seconds)


def retry_db(call: Callable[..., Any], *args: Any, patience_s: float = DB_PATIENCE_S, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, retried with back-off while the database is unreachable.

    Optuna turns connection errors into StorageInternalError; SQLAlchemy's OperationalError can also
    escape. pool_pre_ping (see storage.postgres) gives the next try a fresh connection.
    """
    import sqlalchemy

    deadline, wait = time.monotonic() + patience_s, 1.0
    while True:
        try:
            return call(*args, **kwargs)
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError,
                sqlalchemy.exc.InterfaceError) as exc:
            if time.monotonic() + wait > deadline:
                raise
            log.warning("database unreachable (%s); retrying in %.0f s", str(exc).splitlines()[0][:200], wait)
            time.sleep(wait)
            wait = min(wait * 2, 30.0)


def artifact_store(path: str | None = None) -> FileSystemArtifactStore:
    """The file-system artifact store: `path`, else $PCVIT_ARTIFACT_DIR, else storage/artifacts (created)."""
    folder = pathlib.Path(path or os.environ.get(ARTIFACT_DIR_ENV) or DEFAULT_ARTIFACT_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))
