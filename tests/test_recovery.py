"""Workers die; trials do not stay RUNNING, and retried trials resume from their checkpoints.

Real worker processes on a journal file (one machine) and on a real PostgreSQL server: SIGTERM, SIGKILL,
heartbeats going silent, a database restart, and four workers holding the study-wide budget.
"""

from __future__ import annotations

import json
import signal

import optuna
import pytest
from optuna.trial import TrialState

import objective
import storage
from pcvit import Config, train
from studies.running.owners import OWNER
from studies.running.reaper import Reaper, StalenessWatch
from studies.running.retries import fail_for_retry, requeue
from storage.checkpoints import CheckpointFiles
from studies import cli
from studies.results.replay import trial_config
from studies.results.report import outcome_trials
from studies.studyfile.spec import load_spec
from studies.running.worker import join_study
from studies.running.records import record
from tests.helpers import (checkpoint_epoch, finish, run_workers_to_the_end, running_trial_with_checkpoint,
                           start_worker, tiny_study, trials, wait_for)

LONG = {"epochs": 12, "use_early_stopping": False}  # ~0.3 s an epoch: long enough to be killed midway
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage", "ignore::optuna.exceptions.ExperimentalWarning")


def assert_resumed(retry: optuna.trial.FrozenTrial, failed: optuna.trial.FrozenTrial, epochs: int | None) -> None:
    """The retry went on from its predecessor's checkpoint with the predecessor's earlier reports
    (and, when it finished, reported every one of the `epochs` exactly once)."""
    resumed = retry.user_attrs["resumed_after_epoch"]
    assert resumed >= 1 and resumed == checkpoint_epoch(failed)
    assert retry.system_attrs["retry_history"][-1] == failed.number and retry.params == failed.params
    assert {s: v for s, v in retry.intermediate_values.items() if s <= resumed} == \
           {s: v for s, v in failed.intermediate_values.items() if s <= resumed}
    assert list(retry.intermediate_values)[:resumed] == list(range(1, resumed + 1))
    if epochs is not None:
        assert list(retry.intermediate_values) == list(range(1, epochs + 1))  # every epoch once, none twice
        assert retry.user_attrs["epochs_run"] == epochs


@pytest.mark.slow
def test_stopped_then_killed_worker_lose_nothing_and_the_trial_resumes_exactly(tmp_path, one_thread, capsys):
    url, art = f"journal:///{tmp_path}/study.journal", tmp_path / "art"
    study_file = tiny_study(tmp_path, n_trials=1, fixed=LONG, checkpoint_every_n_epochs=2)

    # SIGTERM: the trial is failed with the reason and re-queued before the worker exits
    log = tmp_path / "stopped.log"
    worker = start_worker(url, study_file, art, log)
    wait_for(lambda: running_trial_with_checkpoint(url, "tiny", 2), 120, "a checkpoint at epoch 2")
    worker.send_signal(signal.SIGTERM)
    assert finish(worker, 30, log) == 128 + signal.SIGTERM
    stopped, retry = trials(url, "tiny")
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "worker stopped by SIGTERM"
    assert retry.state == TrialState.WAITING and retry.system_attrs["retry_history"] == [0]
    checkpoint = checkpoint_epoch(retry)
    assert checkpoint % 2 == 0 and list(retry.intermediate_values) == list(range(1, checkpoint + 1))

    # SIGKILL of the worker running the retry: a zombie until `pcvit-study reap` (or any worker) looks
    log = tmp_path / "killed.log"
    worker = start_worker(url, study_file, art, log)
    wait_for(lambda: running_trial_with_checkpoint(url, "tiny", checkpoint + 2), 120, "a later checkpoint")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert trials(url, "tiny")[1].state == TrialState.RUNNING
    assert cli.main(["reap", "--storage", url, "--study-name", "tiny"]) == 0
    assert "reaped 1 dead trial(s): 1" in capsys.readouterr().out
    stopped, killed, retry = trials(url, "tiny")
    assert killed.state == TrialState.FAIL and "is gone" in killed.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING and retry.system_attrs["retry_history"] == [0, 1]

    log = tmp_path / "rescuer.log"
    assert finish(start_worker(url, study_file, art, log), 180, log) == 0, log.read_text()[-3000:]
    stopped, killed, retry = trials(url, "tiny")
    assert retry.state == TrialState.COMPLETE
    assert_resumed(killed, stopped, None)
    assert_resumed(retry, killed, LONG["epochs"])
    assert not list(art.glob("checkpoint-*"))
    # resuming twice changed nothing: an uninterrupted run of the same trial reports the same accuracies
    uninterrupted = train(Config.from_dict(trial_config(url, "tiny", 2)))
    assert [float(f"{a:.6g}") for a in uninterrupted.probe_accuracies] == list(retry.intermediate_values.values())


def open_study(url, study_file):
    spec = load_spec(study_file)
    db = storage.open_storage(url, spec.heartbeat_interval, spec.grace_period)
    return join_study(db, url, spec.name, spec, sampler_seed=1)[0], spec


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.slow
def test_background_reaper_requeues_a_silent_trial_of_another_machine_not_a_live_one(backend, tmp_path, request):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/s.db"
    else:
        url = request.getfixturevalue("postgres_server").new_database("runner_heartbeat")
    study, spec = open_study(url, tiny_study(tmp_path, heartbeat_interval=1, grace_period=2))
    silent, live = study.ask(), study.ask()
    for trial in (silent, live):  # workers elsewhere: no process id to check here, only heartbeats
        study._storage.set_trial_system_attr(trial._trial_id, OWNER, "elsewhere/boot|pid:[1]|1|1")
    study._storage.record_heartbeat(silent._trial_id)
    with Reaper(study, spec.heartbeat_interval, spec.grace_period, spec.max_retries) as reaper, \
            reaper.beating(live._trial_id):
        wait_for(lambda: reaper.reaped, 20, "the silent trial to be reaped", interval=0.5)
        states = {t.number: t.state for t in study.trials}
    assert reaper.reaped == [0]
    assert states == {0: TrialState.FAIL, 1: TrialState.RUNNING, 2: TrialState.WAITING}
    assert "stopped sending heartbeats" in study.trials[2].user_attrs["retry_reason"]


def test_staleness_is_measured_only_while_the_database_answers():
    watch = StalenessWatch(grace_period=10)
    assert watch.stale({1: "beat-a", 2: "beat-a"}, now=0) == set()
    assert watch.stale({1: "beat-a", 2: "beat-b"}, now=11) == {1}  # 2 beat meanwhile
    watch.forget()  # an outage: its length says nothing about the workers
    assert watch.stale({1: "beat-a", 2: "beat-b"}, now=100) == set()
    assert watch.stale({1: "beat-a", 2: "beat-c"}, now=105) == set()
    assert watch.stale({1: "beat-a", 2: "beat-c"}, now=111) == {1}
    assert watch.stale({1: "beat-a", 2: "beat-c"}, now=116) == {1, 2}


def test_a_trained_trial_killed_before_its_result_was_stored_is_recorded_not_retrained(tmp_path, one_thread, caplog):
    url, art = f"sqlite:///{tmp_path}/s.db", tmp_path / "art"
    study_file = tiny_study(tmp_path, n_trials=1)
    study, spec = open_study(url, study_file)
    trial = study.ask()
    files = CheckpointFiles(art)
    value = objective.objective(trial, spec, storage.artifact_store(str(art)), files)  # trained; never told
    trained = study._storage.get_trial(trial._trial_id)
    assert trained.state == TrialState.RUNNING and record(trained)["checkpoint"]["trained"]
    assert files.ids() == [record(trained)["checkpoint"]["id"]]  # kept until the result is stored
    assert fail_for_retry(study, trained, "test: killed after training")
    requeue(study, study._storage.get_trial(trial._trial_id), spec.max_retries, "test: killed after training")

    with caplog.at_level("INFO", logger="pcvit.objective"):
        assert objective.main(["--storage", url, "--study-file", str(study_file), "--artifact-dir", str(art)]) == 0
    _, retry = study.get_trials()
    assert retry.state == TrialState.COMPLETE and retry.value == value
    assert retry.user_attrs["resumed_after_epoch"] == 3 and retry.intermediate_values == trained.intermediate_values
    assert "recording its result without training again" in caplog.text
    assert files.ids() == []


def test_a_trial_is_retried_at_most_max_retries_times(tmp_path):
    study, spec = open_study(f"sqlite:///{tmp_path}/s.db", tiny_study(tmp_path, max_retries=1))
    first = study.ask()
    assert fail_for_retry(study, study._storage.get_trial(first._trial_id), "test")
    assert requeue(study, study._storage.get_trial(first._trial_id), spec.max_retries, "test") == 1
    retry = study.ask()  # pops the retry
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(
        study._storage.get_trial(retry._trial_id)) == 0  # Optuna's own helpers understand our retries
    assert fail_for_retry(study, study._storage.get_trial(retry._trial_id), "test")
    assert requeue(study, study._storage.get_trial(retry._trial_id), spec.max_retries, "test") is None
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert not fail_for_retry(study, study.trials[0], "again")  # a finished trial is not failed twice


@pytest.mark.slow
def test_four_workers_hold_the_budget_on_postgresql(postgres_server, tmp_path):
    url = postgres_server.new_database("runner_four_workers")
    study_file = tiny_study(tmp_path, n_trials=20, fixed={"epochs": 1, "linear_probe_epochs": 1})
    done, trained = run_workers_to_the_end(url, study_file, tmp_path, workers=4, trials_each=6)
    assert len(trained) == 20 and all(t.state == TrialState.COMPLETE for t in trained)
    assert len({json.dumps(t.params, sort_keys=True) for t in trained}) == 20
    assert not [t for t in done if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({t.user_attrs["worker"] for t in trained}) == 4  # 6 trials at most each: all took part
    assert len({record(t)["sampler_seed"] for t in trained}) == 4  # each with its own sampler seed


@pytest.mark.slow
def test_killed_and_stopped_workers_lose_nothing_on_postgresql(postgres_server, tmp_path):
    url, art = postgres_server.new_database("runner_kill_and_stop"), tmp_path / "art"
    study_file = tiny_study(tmp_path, n_trials=2, fixed=LONG)
    logs = [tmp_path / f"{name}.log" for name in ("killed", "stopped", "rescuer")]
    killed = start_worker(url, study_file, art, logs[0])
    stopped = start_worker(url, study_file, art, logs[1])

    def trial_of(process):
        for t in trials(url, "tiny"):
            if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(f":{process.pid}") \
                    and checkpoint_epoch(t) >= 2:
                return t
        return None

    wait_for(lambda: trial_of(killed), 120, "the first worker's checkpoint")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    wait_for(lambda: trial_of(stopped), 120, "the second worker's checkpoint")
    stopped.send_signal(signal.SIGTERM)
    assert finish(stopped, 60, logs[1]) == 128 + signal.SIGTERM
    assert any(t.state == TrialState.WAITING for t in trials(url, "tiny"))  # SIGTERM re-queued at once
    assert finish(start_worker(url, study_file, art, logs[2]), 300, logs[2]) == 0, logs[2].read_text()[-3000:]

    study = optuna.load_study(study_name="tiny", storage=storage.open_storage(url))
    final = outcome_trials(study)
    assert len(final) == 2 and all(t.state == TrialState.COMPLETE for t in final)
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    reasons = sorted((t.user_attrs["retry_reason"] for t in final if "retry_reason" in t.user_attrs),
                     key=lambda reason: reason.endswith("SIGTERM"))
    assert len(reasons) == 2 and reasons[1].endswith("worker stopped by SIGTERM")
    assert "is gone" in reasons[0] or "stopped sending heartbeats" in reasons[0]  # SIGKILL: found either way
    by_number = {t.number: t for t in study.trials}
    for retry in (t for t in final if "retry_history" in t.system_attrs):
        assert_resumed(retry, by_number[retry.system_attrs["retry_history"][-1]], LONG["epochs"])
    assert sum("retry_history" in t.system_attrs for t in final) == 2


@pytest.mark.slow
def test_workers_ride_out_a_postgresql_restart(postgres_server, tmp_path):
    if not getattr(postgres_server, "can_restart", True):
        pytest.skip("the test server is not ours to restart")
    url = postgres_server.new_database("runner_restart")
    study_file = tiny_study(tmp_path, n_trials=3, fixed={"epochs": 6})
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    workers = [start_worker(url, study_file, tmp_path / "art", log) for log in logs]
    wait_for(lambda: any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials(url, "tiny")),
             120, "a running trial")
    postgres_server.restart(down_s=3)
    for worker, log in zip(workers, logs):
        assert finish(worker, 300, log) == 0, log.read_text()[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage.open_storage(url))
    final = outcome_trials(study)
    assert len(final) == 3 and all(t.state == TrialState.COMPLETE for t in final)
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert any("database unreachable" in log.read_text() or "heartbeat" in log.read_text() for log in logs)
