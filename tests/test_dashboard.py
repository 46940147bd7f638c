"""optuna-dashboard shows our studies: study, trials, intermediate values and artifacts, over its HTTP API."""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import subprocess
import sys
import urllib.request

import pytest

import objective
from studies.running.records import SHOWN
from tests.helpers import tiny_study, wait_for, worker_env

DASHBOARD = str(pathlib.Path(sys.executable).parent / "optuna-dashboard")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def answers(url: str) -> bool:
    try:
        get(url)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def dashboard_of_one_trial(tmp_path: pathlib.Path):
    """A worker runs one tiny trial, then optuna-dashboard serves its storage; yields the dashboard's base URL."""
    url, art = f"sqlite:///{tmp_path}/s.db", tmp_path / "art"
    assert objective.main(["--storage", url, "--study-file", str(tiny_study(tmp_path, n_trials=1)),
                           "--artifact-dir", str(art)]) == 0
    port = free_port()
    log = open(tmp_path / "dashboard.log", "wb")
    dashboard = subprocess.Popen([DASHBOARD, url, "--host", "127.0.0.1", "--port", str(port),
                                  "--artifact-dir", str(art)], stdout=log, stderr=subprocess.STDOUT, env=worker_env())
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{base}/api/studies"), 60, "the dashboard to answer", interval=0.5)
        yield base
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_dashboard_shows_trials_intermediate_values_and_artifacts(tmp_path, one_thread):
    with dashboard_of_one_trial(tmp_path) as base:
        (study,) = [s for s in json.loads(get(f"{base}/api/studies"))["study_summaries"] if s["study_name"] == "tiny"]
        detail = json.loads(get(f"{base}/api/studies/{study['study_id']}"))
        (trial,) = detail["trials"]
        assert trial["state"] == "Complete" and {p["name"] for p in trial["params"]} == {
            "peak_lr_hidden", "peak_lr_weights", "hidden_momentum"}
        assert [v["step"] for v in trial["intermediate_values"]] == [1, 2, 3]
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert "best_probe_accuracy" in attrs and set(attrs) <= set(SHOWN)  # short lines; the rest: `records`
        artifacts = {a["filename"]: a for a in trial["artifacts"]}
        assert {"reconstruction_epoch003.png", "metrics.jsonl", "final_weights.pt"} <= set(artifacts)
        image = artifacts["reconstruction_epoch003.png"]
        png = get(f"{base}/artifacts/{study['study_id']}/{trial['trial_id']}/{image['artifact_id']}")
        assert png[:4] == b"\x89PNG"
        metrics = get(f"{base}/artifacts/{study['study_id']}/{trial['trial_id']}/"
                      f"{artifacts['metrics.jsonl']['artifact_id']}").decode()
        assert [json.loads(line)["epoch"] for line in metrics.splitlines()] == [1, 2, 3]
