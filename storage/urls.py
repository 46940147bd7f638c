"""Storage URLs: which one to use, which file is behind it, and the mistakes refused before anything opens.

See the package docstring for the forms."""

from __future__ import annotations

import os
import pathlib

from storage.postgres import StorageError, mask_password

DEFAULT_URL = "sqlite:///storage/pcvit.db"
URL_ENV = "OPTUNA_STORAGE"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def resolve_url(url: str | None = None) -> str:
    """The storage URL to use: the argument, else $OPTUNA_STORAGE, else the SQLite file under storage/."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


KNOWN_SCHEMES = ("sqlite", "journal", "postgresql", "postgres", "grpc", "mysql")


def check_url_form(url: str) -> None:
    """Refuse (StorageError, one line with the right form) the URL mistakes that would otherwise be read as
    something else: a known scheme without `://` (read as a journal file named after it) and a PostgreSQL URL
    without the driver this runner installs (SQLAlchemy would pick another one, which is not installed)."""
    scheme, colon, rest = url.partition(":")
    base = scheme.split("+", 1)[0].lower()
    if colon and base in KNOWN_SCHEMES and not rest.startswith("//"):
        path = rest.lstrip("/")
        right = {"sqlite": f"sqlite:///{path} (relative) or sqlite:////{path} (absolute)",
                 "journal": f"journal:///{path} (relative) or journal:////{path} (absolute)",
                 "grpc": "grpc://HOST:PORT"}.get(base, f"{base}+psycopg2://USER@HOST:PORT/DB")
        raise StorageError(f"{mask_password(url)}: malformed storage URL: {scheme}: needs //; did you mean {right}?")
    if base in ("postgresql", "postgres") and scheme.lower() != "postgresql+psycopg2":
        fixed = "postgresql+psycopg2" + url[len(scheme):]
        raise StorageError(f"{mask_password(url)}: name the driver this runner installs: {mask_password(fixed)} "
                           f"({scheme}:// would make SQLAlchemy load another PostgreSQL driver, which is not "
                           "installed)")


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
    check_url_form(url)
    path = local_file(url)
    if path is not None and str(path) and not path.is_file():
        raise StorageError(f"{mask_password(url)}: no such storage file {path} (this command only reads, so it "
                           "creates none; check the path: three slashes mean a relative path, four an absolute one)")


def need_folder(path: pathlib.Path, url: str) -> None:
    folder = path.parent
    if not str(path) or path.is_dir():
        raise StorageError(f"{url}: needs a file path after the scheme (e.g. {url.rstrip('/')}/pcvit.db)")
    if not folder.is_dir():
        raise StorageError(f"{url}: the folder {folder}/ does not exist (create it, or fix the path; "
                           "note that three slashes mean a relative path and four an absolute one)")
