"""Every sweep file of the original (tests/data/original_sweeps/) imports into a study file, and that study runs.

A researcher coming from the original brings these files; each must turn into a study (a file without a budget
asks for --n-trials) and one trial of it must train, shrunk to seconds: synthetic data, a width of 8, one or two
inference steps, one epoch. Depth, the probe's nodes and every switch stay as the file sets them."""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import objective
import storage
from studies import cli
from studies.studyfile.spec import load_spec
from tests.helpers import REPO

SWEEPS = sorted((REPO / "tests/data/original_sweeps").glob("*.yaml"))
SHRUNK = {  # what makes a trial take seconds; the rest of the file is kept
    "dataset": "synthetic", "device": "cpu", "epochs": 1, "train_subset": 100, "batch_size": 50, "test_subset": 50,
    "validation_subset": 50, "eval_inference_steps": 2, "reconstruction_steps": 2, "linear_probe_epochs": 1,
    "linear_probe_batch_size": 50, "linear_probe_every_n_epochs": 1, "validation_every_n_epochs": 1,
    "reconstruction_every_n_epochs": 1, "num_images": 1, "inference_steps": 2, "hidden_size": 8,
}
SHRUNK_SPACE = {"hidden_size": [8, 16], "inference_steps": [1, 2]}  # sampled sizes keep being sampled, small
BUDGETLESS = {"sweep_focused_search.yaml", "sweep_probe_es_epochs500_minlr0.1.yaml"}  # bayes, no run_cap


def test_all_twelve_files_of_the_original_are_here():
    assert len(SWEEPS) == 12 and all(p.read_text().lstrip().startswith("program:") for p in SWEEPS)


def shrink(document: dict) -> dict:
    space = {name: ({"type": "categorical", "choices": SHRUNK_SPACE[name]} if name in SHRUNK_SPACE else p)
             for name, p in document["space"].items()}
    fixed = {**document["fixed"], **{k: v for k, v in SHRUNK.items() if k not in space}}
    return {**document, "name": "shrunk", "n_trials": 1, "fixed": fixed, "space": space,
            "checkpoint_every_n_epochs": 0}


@pytest.mark.slow
@pytest.mark.parametrize("sweep", SWEEPS, ids=[p.name for p in SWEEPS])
def test_the_sweep_imports_and_a_trial_of_its_study_runs(sweep, tmp_path, capsys):
    study_file = tmp_path / "study.yaml"
    code = cli.main(["import-wandb", str(sweep), "-o", str(study_file)])
    err = capsys.readouterr().err
    if sweep.name in BUDGETLESS:
        assert code == 2 and "--n-trials" in err and not study_file.exists()
        assert cli.main(["import-wandb", str(sweep), "-o", str(study_file), "--n-trials", "40"]) == 0
        assert "method bayes -> sampler gp" in capsys.readouterr().err
    else:
        assert code == 0, err
    imported = load_spec(study_file)
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(shrink(imported.document), sort_keys=False))
    url = f"sqlite:///{tmp_path}/s.db"
    assert objective.main(["--storage", url, "--study-file", str(small), "--artifact-dir", str(tmp_path / "a")]) == 0
    trials = optuna.load_study(study_name="shrunk", storage=storage.open_storage(url)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE], [t.user_attrs.get("fail_reason") for t in trials]
    ran = trials[0]
    assert ran.user_attrs["epochs_run"] == 1 and 0 <= ran.value <= 1
    assert set(ran.params) >= set(imported.space)  # every sampled parameter was sampled (none is conditional here)
