"""One lock per storage and name, held by one process at a time, on every storage kind the runner uses.

Some check-then-write steps must not interleave between workers: creating the tables of a new SQLite file,
attaching the study file to a new study, adding the single retry of a failed trial. Optuna offers no
compare-and-set for them, so they run under this lock:
* SQLite file and journal file (one machine): an `flock` on `<file>.pcvit-lock` beside it;
* PostgreSQL (many machines): a session advisory lock keyed by the name.
The operating system (or the server, when the connection drops) releases the lock of a process that dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import pathlib
from typing import Any, Iterator

import optuna

LOCK_SUFFIX = ".pcvit-lock"  # not optuna's own ".lock" of the journal file


@contextlib.contextmanager
def file_lock(path: str | pathlib.Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if absent) for the block."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def storage_lock(where: Any, name: str) -> Iterator[None]:
    """Hold the lock `name` of a study's or an Optuna storage's database (SQLite, PostgreSQL or journal file) for
    the block. Storages it cannot lock (MySQL) run the block unlocked."""
    from storage.optuna_access import backend_of, backend_of_study

    backend = backend_of_study(where) if isinstance(where, optuna.Study) else backend_of(where)
    engine = getattr(backend, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        with _advisory_lock(engine, name):
            yield
        return
    path = _lock_file(backend, engine)
    if path is None:
        yield
        return
    with file_lock(f"{path}{LOCK_SUFFIX}"):
        yield


def _lock_file(backend: Any, engine: Any) -> str | None:
    if engine is not None:
        return engine.url.database if engine.dialect.name == "sqlite" else None
    file_backend = getattr(backend, "_backend", None)  # JournalStorage -> JournalFileBackend
    return getattr(file_backend, "_file_path", None)


@contextlib.contextmanager
def _advisory_lock(engine: Any, name: str) -> Iterator[None]:
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"pcvit:{name}".encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        conn.commit()
        try:
            yield
        finally:
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
            except sqlalchemy.exc.SQLAlchemyError:
                pass  # the connection is gone, and the server released the lock with it
