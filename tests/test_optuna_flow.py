"""The Optuna way in: `optuna create-study`, then `pcvit-worker --study-name NAME`, with OPTUNA_STORAGE shared
by every command (ours and Optuna's) for SQLite and the journal file."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import optuna
import pytest

import objective
import storage
from studies.running.records import record
from studies.studyfile.spec import StudyFileError
from studies.studyfile.study_source import resolve_spec
from tests.helpers import REPO, tiny_study, worker_env

BIN = pathlib.Path(sys.executable).parent


def run(command: list[str], env: dict[str, str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=options.pop("cwd", None),
                          **options)


def test_worker_by_name_uses_the_study_file_stored_with_the_study(tmp_path, one_thread, capsys):
    url, art = f"sqlite:///{tmp_path}/s.db", str(tmp_path / "art")
    study_file = tiny_study(tmp_path, n_trials=2)
    run([str(BIN / "optuna"), "create-study", "--storage", url, "--study-name", "tiny", "--direction", "maximize"],
        worker_env(), check=True)
    # no file stored yet and no packaged studies/tiny.yaml: one line that says what to pass, nothing written
    assert objective.main(["--storage", url, "--study-name", "tiny", "--artifact-dir", art]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no packaged studies/tiny.yaml" in err and "pass --study-file FILE" in err
    study = optuna.load_study(study_name="tiny", storage=storage.open_storage(url))
    assert study.user_attrs == {} and not pathlib.Path(art).exists()
    # the first worker brings the file, the next needs only the name
    assert objective.main(["--storage", url, "--study-file", str(study_file), "--artifact-dir", art,
                           "--n-trials", "1"]) == 0
    study_file.unlink()
    assert objective.main(["--storage", url, "--study-name", "tiny", "--artifact-dir", art]) == 0
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]


def test_a_packaged_study_needs_only_its_name():
    spec = resolve_spec(None, "smoke", "study 'smoke'")
    assert spec.name == "smoke" and spec.source == str(REPO / "studies" / "smoke.yaml")
    with pytest.raises(StudyFileError, match="does not exist and no packaged studies/nonesuch.yaml"):
        resolve_spec(None, "nonesuch", "study 'nonesuch'")


LONGEST_LINE = 400  # characters of the `optuna studies` table for a normal study (the study file is not in it)
LONGEST_TRIAL_LINE = 600  # `optuna trials`: params (full floats) and the short user attributes (`records.SHOWN`)


def test_optuna_storage_is_shared_with_optunas_cli_for_a_journal_file(tmp_path):
    journal = tmp_path / "journal.log"
    env = {**worker_env(), "OPTUNA_STORAGE": str(journal)}  # worker_env() drops the variable: set it after
    journal.touch()  # Optuna's CLI reads an existing plain file path as a journal file
    created = run([str(BIN / "optuna"), "create-study", "--study-name", "tiny", "--direction", "maximize"], env)
    assert created.returncode == 0, created.stderr
    worker = run([sys.executable, str(REPO / "objective.py"), "--study-file", str(tiny_study(tmp_path, n_trials=1)),
                  "--artifact-dir", str(tmp_path / "art")], env)
    assert worker.returncode == 0, worker.stderr[-3000:]
    shown = run([str(BIN / "optuna"), "trials", "--study-name", "tiny", "-f", "json"], env)
    assert json.loads(shown.stdout)[0]["state"] == "COMPLETE", shown.stderr
    for command, limit in ((["studies"], LONGEST_LINE), (["trials", "--study-name", "tiny"], LONGEST_TRIAL_LINE)):
        table = run([str(BIN / "optuna"), *command], env)  # the tables Optuna users look at first stay readable
        widest = max(len(line) for line in table.stdout.splitlines())
        print(f"optuna {command[0]}: widest line {widest} characters")
        assert widest < limit, f"optuna {command[0]}: a line of {widest} characters\n{table.stdout[:3000]}"
    (trial,) = optuna.load_study(study_name="tiny", storage=storage.open_storage(str(journal))).trials
    assert "checkpoint" in record(trial) and "untrained_baseline" in trial.user_attrs  # kept, out of the table
    report = run([str(BIN / "pcvit-study"), "report", "--study-name", "tiny", "--format", "json"], env)
    assert json.loads(report.stdout)["trials"] == 1, report.stderr
