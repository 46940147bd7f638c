"""A throwaway PostgreSQL server for the tests: real server, temp folder, loopback port.

Why not a mock: what the runner must survive (connection limits, a server restart, many worker
processes on one study) only shows up against a real server. PostgreSQL refuses to run as root,
so when the tests run as root (CI does) the server runs as an unprivileged system user, created on
first use. The server listens on 127.0.0.1 only, on a free port, with trust authentication for
loopback and fsync off: it holds nothing worth keeping.

Set PCVIT_TEST_POSTGRES_URL (a SQLAlchemy URL of a superuser on a server you started) to use an
external server instead; tests that stop or restart the server are then skipped.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

EXTERNAL_URL_ENV = "PCVIT_TEST_POSTGRES_URL"
SYSTEM_USER = "pcvit-pg"  # OS user that owns the data dir when the tests run as root
ROLE = "pcvit"  # database superuser created by initdb
DATABASE = "pcvit_test"  # database behind `.url`
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresUnavailable(RuntimeError):
    """No server can be started here (no binaries, no unprivileged user); tests skip with this."""


def find_bindir() -> Path:
    """The folder with initdb/pg_ctl: `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found via `pg_config --bindir` or "
        "/usr/lib/postgresql/*/bin; install them with `apt-get install postgresql` "
        f"or set {EXTERNAL_URL_ENV}"
    )


def _version_key(path: str) -> int:
    match = re.search(r"/(\d+)/bin$", path)
    return int(match.group(1)) if match else 0


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_user() -> pwd.struct_passwd | None:
    """The unprivileged OS user to run the server as, or None to run as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", SYSTEM_USER],
        capture_output=True, text=True,
    )
    if result.returncode not in (0, 9):  # 9: created meanwhile by a parallel run
        raise PostgresUnavailable(
            f"running as root and could not create the system user {SYSTEM_USER!r} for PostgreSQL: "
            f"{result.stderr.strip() or result.returncode}"
        )
    return pwd.getpwnam(SYSTEM_USER)


def _admin_connect(url: str):
    """A psycopg2 autocommit connection to the maintenance database of the server behind `url`."""
    import psycopg2
    from sqlalchemy.engine import make_url

    parts = make_url(url)
    conn = psycopg2.connect(
        host=parts.host or "127.0.0.1", port=parts.port or 5432, user=parts.username,
        password=parts.password, dbname="postgres", connect_timeout=10,
    )
    conn.autocommit = True
    return conn


class _Server:
    """What both kinds of server share: `.url`, `.new_database(name)`, `.max_connections`."""

    url: str

    def _database_url(self, name: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def new_database(self, name: str) -> str:
        """Create an empty database `name` (dropping one left by an earlier run) and return its URL."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"database name {name!r} must match {_NAME.pattern}")
        conn = _admin_connect(self.url)
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self._database_url(name)

    def setting(self, name: str) -> str:
        """`SHOW name` on the server, e.g. setting("max_connections")."""
        if not re.fullmatch(r"[a-z_]+", name):
            raise ValueError(f"not a setting name: {name!r}")
        conn = _admin_connect(self.url)
        try:
            with conn.cursor() as cur:
                cur.execute(f"SHOW {name}")
                return cur.fetchone()[0]
        finally:
            conn.close()

    @property
    def max_connections(self) -> int:
        return int(self.setting("max_connections"))


class LocalPostgres(_Server):
    """A PostgreSQL server in its own temp folder, run by `pg_ctl`; restartable on the same port."""

    can_restart = True

    def __init__(self, max_connections: int = 100, password: str | None = None, bindir: Path | None = None) -> None:
        """`password`: require it (scram-sha-256) on TCP, and put it in `.url`; default: trust."""
        self.bindir = bindir or find_bindir()
        self.user = server_user()
        self.root = Path(tempfile.mkdtemp(prefix="pcvit-pg-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "server.log"
        self.port = free_port()
        self._max_connections = max_connections
        self.password = password
        credentials = f"{ROLE}:{password}" if password else ROLE
        self.url = f"postgresql+psycopg2://{credentials}@127.0.0.1:{self.port}/{DATABASE}"
        self.running = False
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        atexit.register(self.close)  # a crashed session still stops its server
        self._initdb()
        self.start()
        self.new_database(DATABASE)

    @property
    def max_connections(self) -> int:
        return self._max_connections

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a server binary as the unprivileged user, from the temp folder."""
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]], cwd=self.root, env=env,
            capture_output=True, text=True, timeout=120, **kwargs,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}) for {self.data_dir}:\n"
                f"{result.stdout}{result.stderr}{self.log_tail()}"
            )
        return result

    def _initdb(self) -> None:
        auth = ["--auth=trust"]
        if self.password:
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self.user is not None:
                os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self._run("initdb", "-D", str(self.data_dir), "-U", ROLE, *auth, "--encoding=UTF8", "--no-sync")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": str(self._max_connections),
            "superuser_reserved_connections": "1" if self._max_connections < 10 else "3",
            "fsync": "off",  # throwaway data: speed over durability
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
        }
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# pcvit tests\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        """Start the server (same port, same data) and wait until it accepts connections."""
        if self.running:
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", "60", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` ends open sessions, `immediate` is a crash."""
        if not self.running:
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down `down_s` seconds, start again: open connections are cut."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return "\n--- server log ---\n" + self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server at once and delete its folder; safe to call twice."""
        if self.root.exists():
            if self.running:
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", check=False)
                self.running = False
            shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.close)


class ExternalPostgres(_Server):
    """A server someone else started (PCVIT_TEST_POSTGRES_URL); we may not stop it."""

    can_restart = False

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            _admin_connect(url).close()
        except Exception as exc:  # psycopg2.OperationalError and friends
            raise PostgresUnavailable(f"{EXTERNAL_URL_ENV} server not reachable: {exc}") from exc

    def _no_restart(self) -> None:
        pytest.skip(f"server from {EXTERNAL_URL_ENV} is not ours to stop or restart")

    def stop(self, mode: str = "fast") -> None:
        self._no_restart()

    def start(self) -> None:
        self._no_restart()

    def restart(self, down_s: float = 0.0) -> None:
        self._no_restart()

    def close(self) -> None:
        pass


def server_for_tests() -> _Server:
    """The external server if PCVIT_TEST_POSTGRES_URL is set, else a fresh local one."""
    url = os.environ.get(EXTERNAL_URL_ENV)
    if url:
        return ExternalPostgres(url)
    return LocalPostgres()
