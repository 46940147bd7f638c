"""Storage: URL resolution and clear errors for bad URLs. (Workers sharing a journal file: test_objective;
sharing PostgreSQL: test_recovery.)"""

from __future__ import annotations

import threading

import optuna
import pytest

import storage
from storage import StorageError, open_storage, resolve_url
from storage.optuna_access import retried


def test_url_comes_from_argument_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    assert resolve_url(None) == "sqlite:///storage/pcvit.db"
    monkeypatch.setenv("OPTUNA_STORAGE", "sqlite:///elsewhere.db")
    assert resolve_url(None) == "sqlite:///elsewhere.db"
    assert resolve_url("journal:///x.journal") == "journal:///x.journal"


@pytest.mark.parametrize(("url", "words"), [
    ("sqlite:////no/such/folder/s.db", "the folder /no/such/folder/ does not exist"),
    ("journal:////no/such/folder/s.journal", "the folder /no/such/folder/ does not exist"),
    ("storage/pcvit.db", "sqlite:///storage/pcvit.db"),
    ("redis://localhost", "not a storage URL"),
    ("sqlite:///:memory:", "in-memory"),
    ("postgresql+psycopg2://nobody:s3cret@127.0.0.1:1/none", "cannot open the storage"),
])
def test_bad_url_is_a_clear_error_naming_it(url, words):
    with pytest.raises(StorageError) as info:
        open_storage(url)
    message = str(info.value)
    assert words in message
    assert "s3cret" not in message
    assert storage.mask_password(url).split("://")[0] in message
    # only a server that did not answer is worth waiting for
    assert isinstance(info.value, storage.StorageUnreachable) == ("127.0.0.1:1/" in url)


@pytest.mark.slow
def test_a_starting_worker_waits_for_a_server_that_does_not_answer_yet(postgres_server):
    if not getattr(postgres_server, "can_restart", False):
        pytest.skip("the test server is not ours to stop")
    url = postgres_server.new_database("storage_wait")
    postgres_server.stop()
    waiter = threading.Timer(3, postgres_server.start)
    waiter.start()
    try:
        opened = storage.wait_for_storage(url, patience_s=60)
    finally:
        waiter.join()
    assert optuna.create_study(storage=opened, study_name="after-the-wait").study_name == "after-the-wait"
    postgres_server.stop()
    try:
        with pytest.raises(storage.StorageUnreachable, match="onnection refused"):
            storage.wait_for_storage(url, patience_s=1)
    finally:
        postgres_server.start()


def test_journal_url_forms(tmp_path):
    assert str(storage.journal_path("journal:///storage/x.journal")) == "storage/x.journal"
    assert str(storage.journal_path(f"journal:///{tmp_path}/x.journal")) == f"{tmp_path}/x.journal"
    db = open_storage(f"journal:///{tmp_path}/x.journal")
    optuna.create_study(storage=db, study_name="s")
    assert (tmp_path / "x.journal").is_file()


def test_artifact_dir_from_argument_then_environment(tmp_path, monkeypatch):
    import io

    monkeypatch.setenv("PCVIT_ARTIFACT_DIR", str(tmp_path / "env"))
    storage.artifact_store(str(tmp_path / "arg")).write("a1", io.BytesIO(b"x"))
    storage.artifact_store().write("a2", io.BytesIO(b"y"))
    assert (tmp_path / "arg/a1").read_bytes() == b"x" and (tmp_path / "env/a2").read_bytes() == b"y"


def test_retry_db_waits_out_an_outage_then_gives_up():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise optuna.exceptions.StorageInternalError("connection refused")
        return "ok"

    assert retried(flaky) == "ok" and len(calls) == 2
    with pytest.raises(optuna.exceptions.StorageInternalError):
        retried(lambda: (_ for _ in ()).throw(optuna.exceptions.StorageInternalError("down")),
                         patience_s=0)
