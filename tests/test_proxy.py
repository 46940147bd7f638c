"""The gRPC storage proxy: workers, the report and the launcher through `grpc://HOST:PORT`, and what is refused."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

import storage
from studies.running.reaper import HEARTBEAT
from tests import pg
from tests.helpers import REPO, tiny_study, wait_for, worker_env


def study_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "studies.cli", *args], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=120)


def answers(url: str) -> bool:
    try:
        storage.open_storage(url).close()
    except storage.StorageUnreachable:
        return False
    return True


def test_an_unreachable_proxy_is_one_line_naming_the_address():
    port = pg.free_port()  # nothing listens there
    result = study_cli("report", "--storage", f"grpc://127.0.0.1:{port}", "--study-name", "x")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port}" in result.stderr, result.stderr


def test_a_bad_proxy_url_and_a_proxy_in_front_of_sqlite_are_refused(tmp_path):
    with pytest.raises(storage.StorageError, match="grpc://HOST:PORT"):
        storage.open_storage("grpc://no-port")
    result = study_cli("proxy", "--storage", f"sqlite:///{tmp_path}/x.db")
    assert result.returncode == 2 and "PostgreSQL only" in result.stderr, result.stderr


@pytest.mark.slow
def test_a_worker_runs_a_study_through_the_proxy_and_beats_through_it(postgres_server, tmp_path):
    url, port = postgres_server.new_database("through_proxy"), pg.free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "studies.cli", "proxy", "--storage", url, "--port", str(port),
                              "--connections", "2"], cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: answers(f"grpc://127.0.0.1:{port}"), 60, "the proxy")
        study_file = tiny_study(tmp_path, name="through_proxy", n_trials=3)
        worker = subprocess.run([sys.executable, "objective.py", "--storage", f"grpc://127.0.0.1:{port}",
                                 "--study-file", str(study_file), "--artifact-dir", str(tmp_path / "art")],
                                cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=240)
        assert worker.returncode == 0, worker.stderr[-3000:]
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    trials = optuna.load_study(study_name="through_proxy", storage=storage.open_storage(url)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(t.system_attrs.get(HEARTBEAT, 0) >= 1 for t in trials)  # beats went through the proxy
