"""storage/postgres.py against real PostgreSQL servers: the budget check and surviving a restart."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

from storage.postgres import (
    DASHBOARD_CONNECTIONS,
    PER_WORKER,
    POOL_SIZE,
    StorageError,
    check_connection_budget,
    engine_kwargs,
    is_postgres_url,
    mask_password,
)
from tests import pg

SMALL_MAX_CONNECTIONS = 12  # 3 reserved for superusers: 9 left, room for 1 worker + 1 dashboard


@pytest.fixture(scope="module")
def small_server():
    """A server of our own with few connections, which these tests may also restart."""
    try:
        server = pg.LocalPostgres(max_connections=SMALL_MAX_CONNECTIONS)
    except pg.PostgresUnavailable as exc:
        pytest.skip(str(exc))
    yield server
    server.close()


def with_password(url: str, password: str) -> str:
    """The same URL with a password (trust auth ignores it), to check it never shows."""
    return make_url(url).set(password=password).render_as_string(hide_password=False)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql+psycopg2://u:s3cret@db:5432/x", "postgresql+psycopg2://u:***@db:5432/x"),
        ("postgresql://u:p@ss:w/rd@db/x", "postgresql://u:***@db/x"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("sqlite:///storage/pcvit.db", "sqlite:///storage/pcvit.db"),
    ],
)
def test_mask_password_hides_only_the_password(url, masked):
    assert mask_password(url) == masked


def test_is_postgres_url():
    assert is_postgres_url("postgresql+psycopg2://u@h/db")
    assert is_postgres_url("postgresql://u@h/db")
    assert not is_postgres_url("sqlite:///storage/pcvit.db")
    assert not is_postgres_url(None)


@pytest.mark.slow
def test_budget_fits_a_few_workers_on_a_default_server(postgres_server):
    check_connection_budget(postgres_server.url, clients=4)


@pytest.mark.slow
def test_budget_counts_workers_times_pool_plus_dashboard(small_server):
    limit = SMALL_MAX_CONNECTIONS - 3
    assert PER_WORKER + DASHBOARD_CONNECTIONS <= limit < 2 * PER_WORKER + DASHBOARD_CONNECTIONS
    check_connection_budget(small_server.url, clients=1)
    url = with_password(small_server.url, "s3cret")
    with pytest.raises(StorageError) as caught:
        check_connection_budget(url, clients=2)
    message = str(caught.value)
    assert "s3cret" not in message
    assert mask_password(url) in message
    needed = 2 * PER_WORKER + DASHBOARD_CONNECTIONS
    for number in (f"2 workers x {PER_WORKER}", f"= {needed} needed", f"max_connections {SMALL_MAX_CONNECTIONS}",
                   f"3 reserved = {limit}", "Start at most 1 workers"):
        assert number in message


@pytest.mark.slow
def test_budget_subtracts_connections_already_open(small_server):
    engine = sqlalchemy.create_engine(small_server.url, poolclass=sqlalchemy.pool.NullPool)
    held = [engine.connect() for _ in range(3)]
    try:
        with pytest.raises(StorageError, match="plus 3 already in use"):
            check_connection_budget(small_server.url, clients=1)
        check_connection_budget(small_server.url, clients=1, dashboards=0)
    finally:
        for conn in held:
            conn.close()
        engine.dispose()


def test_budget_names_an_unreachable_server():
    url = f"postgresql+psycopg2://pcvit:s3cret@127.0.0.1:{pg.free_port()}/nowhere"
    named = r"cannot connect to .*pcvit:\*\*\*@127\.0\.0\.1.*Connection refused"
    with pytest.raises(StorageError, match=named) as caught:
        check_connection_budget(url, clients=1)
    assert "s3cret" not in str(caught.value)


@pytest.mark.slow
def test_a_wrong_password_is_reported_as_such(tmp_path, capsys):
    try:
        server = pg.LocalPostgres(password="right-one")
    except pg.PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        url = with_password(server.url, "wrong-one")
        with pytest.raises(StorageError, match=r"cannot connect to .*password authentication failed") as caught:
            check_connection_budget(url, clients=1)
        assert "wrong-one" not in str(caught.value) and "\n" not in str(caught.value)
    finally:
        server.close()


def test_engine_opens_at_most_per_worker_connections(small_server):
    engine = sqlalchemy.create_engine(small_server.url, **{**engine_kwargs(), "pool_timeout": 0.5})
    try:
        assert engine.pool.size() == POOL_SIZE
        held = [engine.connect() for _ in range(PER_WORKER)]
        with pytest.raises(sqlalchemy.exc.TimeoutError):
            engine.connect()
        for conn in held:
            conn.close()
    finally:
        engine.dispose()


def backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()


@pytest.mark.slow
def test_pre_ping_survives_a_server_restart(small_server):
    hardened = sqlalchemy.create_engine(small_server.url, **engine_kwargs())
    plain = sqlalchemy.create_engine(small_server.url, pool_pre_ping=False)
    try:
        before = backend_pid(hardened)
        backend_pid(plain)
        small_server.restart()
        assert backend_pid(hardened) != before  # a stale pooled connection was replaced, no error
        with pytest.raises(sqlalchemy.exc.OperationalError):  # the restart really cut connections
            backend_pid(plain)
    finally:
        hardened.dispose()
        plain.dispose()


@pytest.mark.slow
def test_optuna_storage_goes_on_after_a_server_restart(small_server):
    url = small_server.new_database("restart_study")
    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs())
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    small_server.restart()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    states = [t.state for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 4
    storage.engine.dispose()


@pytest.mark.slow
def test_test_server_restarts_on_its_port_with_its_data(small_server):
    """The fixture contract the runner tests lean on: stop/start/restart keep the URL and the data."""
    url = small_server.new_database("kept")
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
        small_server.stop()
        with pytest.raises(sqlalchemy.exc.OperationalError):
            engine.connect()
        small_server.start()
        small_server.restart()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT x FROM t").scalar_one() == 7
        assert small_server.new_database("kept") == url  # fresh again: the table is gone
        with engine.connect() as conn, pytest.raises(sqlalchemy.exc.ProgrammingError):
            conn.exec_driver_sql("SELECT x FROM t")
    finally:
        engine.dispose()


def test_a_server_that_refuses_connections_is_an_outage_to_wait_for_not_bad_input():
    """A refused connection is StorageUnreachable (the worker waits for it), not an error in its input."""
    import socket

    from storage import StorageUnreachable, open_storage

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StorageUnreachable, match="(?i)refused"):
        open_storage(f"postgresql+psycopg2://pcvit@127.0.0.1:{port}/none")


def test_a_refusal_wrapped_by_optuna_while_it_opens_the_storage_is_an_outage(tmp_path, monkeypatch):
    """The server can go away between Optuna creating its tables and reading its schema version: Optuna then
    raises StorageInternalError from the refused connection. That race cannot be timed in a test, so Optuna's
    constructor is made to raise exactly that; the storage layer must read the cause and call it an outage."""
    import optuna

    from storage import StorageUnreachable, open_storage

    def refused(*args, **kwargs):
        try:
            raise sqlalchemy.exc.OperationalError("connect", {}, Exception("Connection refused"))
        except sqlalchemy.exc.OperationalError as exc:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc

    monkeypatch.setattr(optuna.storages, "RDBStorage", refused)
    with pytest.raises(StorageUnreachable, match="(?i)refused"):
        open_storage(f"sqlite:///{tmp_path}/s.db")
