"""A W&B server out of reach or a full artifact disk costs a warning, never the trial's result."""

from __future__ import annotations

import logging
import shutil

import pytest
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState

import objective
import storage
from storage.checkpoints import CheckpointFiles
from studies.studyfile.spec import load_spec
from studies.running.worker import join_study, run_worker
from tests.pg import free_port
from tests.helpers import finish, start_worker, tiny_study, trials, worker_env

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage", "ignore::optuna.exceptions.ExperimentalWarning")


class FullDiskStore(FileSystemArtifactStore):
    """An artifact store whose disk is full: every upload is written to /dev/full (ENOSPC from the kernel)."""

    def write(self, artifact_id, content_body):
        with open("/dev/full", "wb") as f:
            shutil.copyfileobj(content_body, f)


def test_uploads_to_a_full_disk_warn_and_the_trial_keeps_its_value(tmp_path, one_thread, caplog):
    url = f"sqlite:///{tmp_path}/s.db"
    spec = load_spec(tiny_study(tmp_path, n_trials=1))
    db = storage.open_storage(url, spec.heartbeat_interval, spec.grace_period)
    study = join_study(db, url, spec.name, spec, sampler_seed=1)[0]
    store, checkpoints = FullDiskStore(str(tmp_path)), CheckpointFiles(tmp_path / "checkpoints")
    with caplog.at_level(logging.WARNING, logger="pcvit.side_channels"):
        code = run_worker(study, spec, lambda trial: objective.objective(trial, spec, store, checkpoints), 1,
                          checkpoints)
    assert code == 0
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.value == trial.user_attrs["best_probe_accuracy"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "pcvit.side_channels"]
    uploads = {"reconstruction_epoch003.png", "metrics.jsonl", "final_weights.pt"}
    assert {name for name in uploads if any(f"upload of {name} failed" in w for w in warnings)} == uploads
    assert all("No space left on device" in w for w in warnings)


@pytest.mark.slow
def test_an_unreachable_wandb_server_costs_one_warning_not_the_trial(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study_file = tiny_study(tmp_path, n_trials=1)
    env = worker_env(WANDB_MODE="online", WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}",
                     WANDB_INIT_TIMEOUT="5", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    log = tmp_path / "worker.log"
    worker = start_worker(url, study_file, tmp_path / "art", log, "--wandb", "pcvit-tests", env=env)
    assert finish(worker, 240, log) == 0, log.read_text()[-3000:]
    (trial,) = trials(url, "tiny")
    assert trial.state == TrialState.COMPLETE and trial.value == trial.user_attrs["best_probe_accuracy"]
    warnings = [line for line in log.read_text().splitlines() if "W&B failed" in line]
    assert len(warnings) == 1 and "on_start" in warnings[0], log.read_text()[-3000:]
    assert "wandb_run_id" not in trial.user_attrs
