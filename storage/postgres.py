"""PostgreSQL for many workers: engine options that hold for hours, and the connection budget.

A study of 500 trials runs for days with one worker per GPU on several machines, all on one server.
Two things go wrong there: pooled connections die under the workers (a server restart, a NAT or
firewall dropping idle TCP) and the server runs out of connections. `engine_kwargs()` answers the
first (check a connection before use, recycle, keep-alives, a connect timeout); the second is a sum,
done by `check_connection_budget()` before workers start, instead of at 3 a.m. when a connection
is refused mid-study.
"""

from __future__ import annotations

POOL_SIZE = 2  # a worker's main thread + its heartbeat/reaper thread each hold one connection at peak
MAX_OVERFLOW = 1  # one spare: the advisory lock (storage.locks) held while a retry is added
PER_WORKER = POOL_SIZE + MAX_OVERFLOW  # the most connections one worker process can open
DASHBOARD_CONNECTIONS = 5  # optuna-dashboard keeps SQLAlchemy's default pool (pool_size 5)


class StorageError(RuntimeError):
    """The storage cannot serve the planned workers; the message names the URL and the numbers."""


class StorageUnreachable(StorageError):
    """The database server did not answer (refused, timed out, restarting): it may be back in a moment."""


_UNREACHABLE = ("connection refused", "could not connect", "timeout expired", "starting up", "shutting down",
                "server closed the connection", "terminating connection", "no route to host")


def storage_error(message: str, reason: object) -> StorageError:
    """StorageUnreachable when `reason` says the server did not answer, else StorageError."""
    kind = StorageUnreachable if any(words in str(reason).lower() for words in _UNREACHABLE) else StorageError
    return kind(f"{message}: {str(reason).strip()}")


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def mask_password(url: str) -> str:
    """The URL with its password replaced by ***, safe for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host_and_path = rest.rpartition("@")  # the last @: passwords may hold one
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host_and_path}"


def engine_kwargs() -> dict:
    """`sqlalchemy.create_engine` options for a PostgreSQL URL, for workers that run for hours.

    Pass them as `optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs())`.
    """
    return {
        "pool_pre_ping": True,  # test each connection at checkout: survives a server restart
        "pool_size": POOL_SIZE,
        "max_overflow": MAX_OVERFLOW,
        "pool_recycle": 1800,  # seconds; replace connections before idle-TCP timeouts of middleboxes
        "pool_timeout": 60,  # seconds to wait for a free pooled connection before raising
        "connect_args": {  # libpq parameters (psycopg2)
            "connect_timeout": 10,  # seconds; a dead host fails fast instead of hanging a worker
            "keepalives": 1,  # TCP keep-alives find a silently dropped connection within ~2 min
            "keepalives_idle": 60,
            "keepalives_interval": 10,
            "keepalives_count": 6,
            "application_name": "pcvit",  # shows who holds connections in pg_stat_activity
        },
    }


def check_connection_budget(
    url: str, clients: int, per_client: int | None = None, *, dashboards: int = 1
) -> None:
    """Raise StorageError unless the server behind `url` has room for `clients` more workers.

    needed = clients * per_client + dashboards * DASHBOARD_CONNECTIONS, and it must fit into
    max_connections - superuser_reserved_connections - reserved_connections (PostgreSQL 16+),
    less the client connections already open (other machines' workers, a running dashboard).
    Pass dashboards=0 when the dashboard is already running (it is then counted as open).
    """
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    per_client = PER_WORKER if per_client is None else per_client
    if clients < 0 or per_client < 0 or dashboards < 0:
        raise ValueError("clients, per_client and dashboards must not be negative")
    masked = mask_password(url)
    engine = sqlalchemy.create_engine(
        url, poolclass=NullPool, connect_args={"connect_timeout": 10, "application_name": "pcvit-budget"}
    )
    try:
        conn = engine.connect()
    except sqlalchemy.exc.SQLAlchemyError as exc:  # wrong password, no server, no such database
        engine.dispose()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise storage_error(f"cannot connect to {masked}", reason) from None  # refused: worth waiting for
    try:
        with conn:
            max_connections = int(conn.exec_driver_sql("SHOW max_connections").scalar_one())
            reserved = int(conn.exec_driver_sql("SHOW superuser_reserved_connections").scalar_one())
            reserved += _reserved_connections(conn)
            in_use = int(conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).scalar_one())
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise storage_error(f"cannot read the connection limits of {masked}", exc.orig or exc) from exc
    finally:
        engine.dispose()

    limit = max_connections - reserved
    for_dashboards = dashboards * DASHBOARD_CONNECTIONS
    needed = clients * per_client + for_dashboards
    if in_use + needed > limit:
        fits = max(0, limit - in_use - for_dashboards) // max(per_client, 1)
        raise StorageError(
            f"PostgreSQL at {masked} has too few connections: {clients} workers x {per_client} "
            f"+ {dashboards} dashboard(s) x {DASHBOARD_CONNECTIONS} = {needed} needed, plus {in_use} "
            f"already in use, but max_connections {max_connections} - {reserved} reserved = {limit}. "
            f"Start at most {fits} workers, or raise max_connections on the server "
            f"(postgres -c max_connections=N, or max_connections in postgresql.conf, then restart it)."
        )


def _reserved_connections(conn) -> int:
    """`reserved_connections` (PostgreSQL 16+, for pg_use_reserved_connections roles); 0 before."""
    import sqlalchemy

    if conn.dialect.server_version_info and conn.dialect.server_version_info[0] < 16:
        return 0
    try:
        return int(conn.exec_driver_sql("SHOW reserved_connections").scalar_one())
    except sqlalchemy.exc.ProgrammingError:
        conn.rollback()
        return 0
