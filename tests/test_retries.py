"""Exactly one retry per failed trial, race-free study set-up, and who counts as the same machine.

Races are run for real: several threads, each with its own storage connection (as separate worker
processes would have), released together by a barrier, on SQLite, the journal file and PostgreSQL.
"""

from __future__ import annotations

import os
import socket
import threading

import optuna
import pytest
from optuna.trial import TrialState

import storage
from studies.running import owners
from storage.optuna_access import fail_if_running
from studies.running.retries import RETRY_REASON, fail_for_retry, repair_missing_retries, requeue
from studies.studyfile.spec import StudyFileError, load_spec, stored_document
from studies.running.worker import join_study
from tests.helpers import tiny_study

RACERS = 4
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage", "ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    if request.param == "journal":
        return f"journal:///{tmp_path}/s.journal"
    return request.getfixturevalue("postgres_server").new_database("retries_race")


def race(work, n: int = RACERS) -> list:
    """Run `work(i)` in n threads released at once; return their results (re-raising the first error)."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def joined(url, study_file):
    spec = load_spec(study_file)
    db = storage.open_storage(url, spec.heartbeat_interval, spec.grace_period)
    return join_study(db, url, spec.name, spec, sampler_seed=1)[0], spec


def test_concurrent_reapers_fail_a_trial_once_and_queue_one_retry(url, tmp_path):
    study_file = tiny_study(tmp_path)
    study, spec = joined(url, study_file)
    trial = study.ask()

    def reap(_):
        mine, _ = joined(url, study_file)  # its own connection, as another worker
        frozen = mine._storage.get_trial(trial._trial_id)
        won = fail_for_retry(mine, frozen, "test: worker gone")
        return won, won and requeue(mine, mine._storage.get_trial(trial._trial_id), spec.max_retries, "test")

    assert sorted(race(reap), key=str) == [(False, False)] * (RACERS - 1) + [(True, 1)]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]


def test_a_missing_retry_is_repaired_exactly_once(url, tmp_path):
    study_file = tiny_study(tmp_path)
    study, spec = joined(url, study_file)
    trial = study.ask()
    # the reaper that failed it was killed before it queued the retry
    assert fail_for_retry(study, study._storage.get_trial(trial._trial_id), "test: worker gone")
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]

    def repair(_):
        mine, _ = joined(url, study_file)
        return repair_missing_retries(mine, spec.max_retries)

    assert sorted(race(repair)) == [[], [], [], [0]]
    retry = study.get_trials()[1]
    assert retry.state == TrialState.WAITING and retry.system_attrs["retry_history"] == [0]
    assert repair_missing_retries(study, spec.max_retries) == []


def test_a_trial_that_failed_with_an_error_is_not_repaired(tmp_path):
    study, spec = joined(f"sqlite:///{tmp_path}/s.db", tiny_study(tmp_path))
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)  # an error: no retry was ever wanted
    assert RETRY_REASON not in study.trials[0].system_attrs
    assert repair_missing_retries(study, spec.max_retries) == [] and len(study.trials) == 1


def test_a_finished_trial_is_never_failed(url, tmp_path):
    study, _ = joined(url, tiny_study(tmp_path))
    trial = study.ask()
    study.tell(trial, 0.5)
    assert not fail_if_running(study, trial)
    assert not fail_for_retry(study, study._storage.get_trial(trial._trial_id), "late reaper")
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].value == 0.5


def test_workers_opening_a_new_sqlite_file_together_all_get_in(tmp_path):
    url = f"sqlite:///{tmp_path}/new.db"
    opened = race(lambda _: storage.open_storage(url, 1, 4), n=8)
    assert all(isinstance(s, optuna.storages.BaseStorage) for s in opened)


def test_two_files_joining_a_new_study_at_once_let_exactly_one_in(url, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    files = [tiny_study(tmp_path / "a", n_trials=3), tiny_study(tmp_path / "b", n_trials=5)]

    def join(i):
        try:
            joined(url, files[i % 2])
            return "in"
        except StudyFileError as exc:
            assert "refuses to join" in str(exc)
            return "refused"

    outcomes = race(join)
    stored = stored_document(optuna.load_study(study_name="tiny", storage=storage.open_storage(url)))[0]
    winners = [i for i, outcome in enumerate(outcomes) if outcome == "in"]
    assert winners and all(load_spec(files[i % 2]).document["n_trials"] == stored["n_trials"] for i in winners)
    assert len({i % 2 for i in winners}) == 1  # only one of the two files got in


def test_same_hostname_on_another_boot_is_another_machine():
    mine = owners.process_identity()
    machine, namespace, pid, start = mine.split("|")
    assert machine == f"{socket.gethostname()}/{open('/proc/sys/kernel/random/boot_id').read().strip()}"
    assert owners.owner_is_alive(mine) and not owners.owner_is_dead(mine)
    twin = f"{socket.gethostname()}/00000000-0000-0000-0000-000000000000|{namespace}|{pid}|{start}"
    assert not owners.on_this_machine(twin)
    assert not owners.owner_is_dead(twin) and not owners.owner_is_alive(twin)  # only its heartbeat can tell
    gone = f"{machine}|{namespace}|{os.getpid()}|{int(start) + 1}"  # this PID, but another process
    assert owners.owner_is_dead(gone)
