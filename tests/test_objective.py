"""The objective and the worker end to end on real storages: sampling, reporting, pruning, divergence,
the per-trial record, artifacts, the study-wide budget, and Optuna's own CLI on our studies."""

from __future__ import annotations

import itertools
import json
import pathlib
import subprocess
import sys

import optuna
import PIL.Image
import pytest
import torch
import yaml
from optuna.trial import TrialState
from optuna_dashboard import get_note

import objective
import storage
from pcvit import Config, train
from pcvit.data import FASHION_MNIST_DIR
from studies import cli
from studies.results.replay import trial_config
from studies.studyfile.spec import load_spec, stored_document
from studies.running.worker import run_worker
from tests.helpers import TINY_SPACE, run_workers_to_the_end, tiny_study, worker_env
from studies.running.records import SHOWN, record

OPTUNA_CLI = str(pathlib.Path(sys.executable).parent / "optuna")
RECORD = ("best_probe_accuracy", "best_train_mse", "final_train_mse", "best_val_mse", "epochs_run", "stop_reason",
          "diverged", "wall_time_s", "device", "implementation", "versions", "seed", "sampler_seed", "worker",
          "precision", "min_val_mse", "probe_converged")


pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(url, study_file, artifacts, *extra):
    return objective.main(["--storage", url, "--study-file", str(study_file), "--artifact-dir", str(artifacts),
                           *extra])


def load(url, name="tiny"):
    return optuna.load_study(study_name=name, storage=storage.open_storage(url))


@pytest.mark.slow
def test_worker_creates_the_study_runs_trials_and_records_everything(tmp_path):
    url, art = f"sqlite:///{tmp_path}/s.db", tmp_path / "art"
    study_file = tiny_study(tmp_path, n_trials=2)
    assert run_main(url, study_file, art) == 0
    study = load(url)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    document, text = stored_document(study)
    assert document["n_trials"] == 2 and "name: tiny" in text
    assert study.user_attrs["study_file"] == "tiny.yaml" and "study_spec" not in study.user_attrs  # short for the CLI
    assert study.metric_names == ["best_probe_accuracy"]  # the dashboard's axes say what they show
    study_note = get_note(study)
    assert "## Study tiny: maximize best_probe_accuracy" in study_note and "2 of 2 trials" in study_note
    assert "```yaml\n" + study_file.read_text().rstrip() + "\n```" in study_note  # the file, whole
    done = study.get_trials()
    assert [t.state for t in done] == [TrialState.COMPLETE] * 2
    for t in done:
        assert set(t.params) == {"peak_lr_hidden", "peak_lr_weights", "hidden_momentum"}
        assert 0.05 <= t.params["peak_lr_hidden"] <= 0.11
        assert list(t.intermediate_values) == [1, 2, 3]  # one report per probe, every epoch
        assert t.value == max(t.intermediate_values.values()) == t.user_attrs["best_probe_accuracy"]
        assert set(RECORD) <= set(record(t)) and t.user_attrs["epochs_run"] == 3
        assert set(t.user_attrs) <= set(SHOWN)  # the rest is kept out of `optuna trials` and the dashboard's lines
        assert all(f"{name} " in record(t)["versions"] for name in ("torch", "optuna", "python", "code"))
        assert set(record(t)["node_diagnostics"]) >= {"node_energy", "state_rms", "grad_norm"}
        assert t.user_attrs["seed"] == 10 and record(t)["checkpoint"]["trained"]
        assert record(t)["best_train_mse"] == float(f"{record(t)['best_train_mse']:.4g}")
        assert t.value == float(f"{t.value:.6g}")
        note = get_note(optuna.Trial(study, t._trial_id))
        assert note.startswith(f"### Trial {t.number}: completed") and "best probe accuracy" in note
        names = {m.filename: m for m in optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)}
        assert {"reconstruction_epoch003.png", "metrics.jsonl", "final_weights.pt", "curves.png"} <= set(names)
        assert (art / names["curves.png"].artifact_id).read_bytes()[:4] == b"\x89PNG"
        lines = (art / names["metrics.jsonl"].artifact_id).read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
        assert (art / names["reconstruction_epoch003.png"].artifact_id).read_bytes()[:4] == b"\x89PNG"
        with PIL.Image.open(art / names["reconstruction_epoch003.png"].artifact_id) as grid:
            assert grid.size[0] >= 384  # two labelled 192-pixel columns, not a 104x36 thumbnail
    assert not list(art.glob("checkpoint-*"))  # finished trials leave no checkpoint behind
    assert len({t.params["peak_lr_hidden"] for t in done}) == 2

    # the budget is spent: a second worker leaves at once
    assert run_main(url, study_file, art) == 0 and len(load(url).trials) == 2


@pytest.mark.slow
def test_a_trial_replays_exactly_from_the_storage(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    study_file = tiny_study(tmp_path, n_trials=2, space={
        **TINY_SPACE, "intermediate_l1_coeff": {"type": "zero_or_log", "low": 1e-4, "high": 1e-2}})
    study = optuna.create_study(study_name="tiny", storage=storage.open_storage(url), direction="maximize")
    study.enqueue_trial({"intermediate_l1_coeff_is_zero": True})
    study.enqueue_trial({"intermediate_l1_coeff_is_zero": False, "intermediate_l1_coeff": 3e-3})
    assert run_main(url, study_file, tmp_path / "art") == 0
    done = load(url).trials
    assert trial_config(url, "tiny", 0)["intermediate_l1_coeff"] == 0.0
    config = trial_config(url, "tiny", 1)
    assert config["peak_lr_hidden"] == done[1].params["peak_lr_hidden"] and config["seed"] == 10
    assert config["intermediate_l1_coeff"] == 3e-3
    replay = train(Config.from_dict(config))
    assert [float(f"{a:.6g}") for a in replay.probe_accuracies] == list(done[1].intermediate_values.values())

    # the same through the commands: show-config prints it for pcvit-train --config; replay runs it
    capsys.readouterr()
    assert cli.main(["show-config", "--storage", url, "--study-name", "tiny", "1"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == config
    summary = tmp_path / "replay.json"
    assert cli.main(["replay", "--storage", url, "--study-name", "tiny", "1", "--no-progress",
                     "--out", str(tmp_path / "run"), "--summary-json", str(summary)]) == 0
    assert json.loads(summary.read_text())["probe_accuracies"] == replay.probe_accuracies
    assert cli.main(["show-config", "--storage", url, "--study-name", "tiny", "7"]) == 2
    assert "has no trial 7" in capsys.readouterr().err


@pytest.mark.slow
def test_worker_joins_a_study_made_by_optuna_create_study(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    env = worker_env()
    subprocess.run([OPTUNA_CLI, "create-study", "--storage", url, "--study-name", "tiny", "--direction",
                    "maximize"], check=True, env=env, capture_output=True)
    assert run_main(url, tiny_study(tmp_path, n_trials=1), tmp_path / "art") == 0
    shown = subprocess.run([OPTUNA_CLI, "trials", "--storage", url, "--study-name", "tiny", "-f", "json"],
                           check=True, env=env, capture_output=True, text=True).stdout
    assert json.loads(shown)[0]["state"] == "COMPLETE"
    best = subprocess.run([OPTUNA_CLI, "best-trial", "--storage", url, "--study-name", "tiny", "-f", "json"],
                          check=True, env=env, capture_output=True, text=True).stdout
    assert json.loads(best)["number"] == 0


def test_worker_refuses_a_study_made_for_the_other_direction(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    subprocess.run([OPTUNA_CLI, "create-study", "--storage", url, "--study-name", "tiny", "--direction",
                    "minimize"], check=True, env=worker_env(), capture_output=True)
    assert run_main(url, tiny_study(tmp_path), tmp_path / "art") == 2
    assert "direction" in capsys.readouterr().err and load(url).user_attrs == {}


@pytest.mark.slow
def test_worker_with_a_different_study_file_refuses_with_a_diff_and_changes_nothing(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    assert run_main(url, tiny_study(tmp_path, n_trials=1), tmp_path / "art") == 0
    before = load(url)
    changed = tiny_study(tmp_path, n_trials=5, fixed={"epochs": 4})
    assert run_main(url, changed, tmp_path / "art") == 2
    err = capsys.readouterr().err
    assert "n_trials: stored 1, this file 5" in err and "fixed.epochs: stored 3, this file 4" in err
    after = load(url)
    assert len(after.trials) == len(before.trials) and after.user_attrs == before.user_attrs


@pytest.mark.slow
def test_a_study_can_turn_the_controls_off(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    assert run_main(url, tiny_study(tmp_path, n_trials=1, controls=False), tmp_path / "art") == 0
    (done,) = load(url).trials
    assert done.state == TrialState.COMPLETE and "untrained_baseline" not in done.user_attrs


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_best_trial_records_how_affine_its_features_are_and_the_report_says_it(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    fashion = {"dataset": "fashion-mnist", "train_subset": 900, "test_subset": 200, "validation_subset": 100,
               "batch_size": 100, "epochs": 1, "validation_every_n_epochs": 1, "reconstruction_every_n_epochs": 1,
               "use_noise": False, "use_status_init_in_training": True, "use_status_init_in_unmasking": True,
               "linear_probe_solver": "lbfgs"}
    assert run_main(url, tiny_study(tmp_path, n_trials=1, fixed=fashion), tmp_path / "art") == 0
    kept = record(load(url).trials[0])
    assert 0.9 < kept["feature_linearity_r2"] <= 1 and 0.9 < kept["untrained_linearity_r2"] <= 1  # T = 2: affine
    assert "feature_linearity_r2" not in load(url).trials[0].user_attrs  # a system attribute, out of the table
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 0
    assert f"affine map of the pixels to R^2 {kept['feature_linearity_r2']:.4f}" in capsys.readouterr().out


@pytest.mark.slow
def test_pruner_stops_a_clearly_bad_trial_and_keeps_a_good_one(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    good, bad = {"linear_probe_lr": 0.1}, {"linear_probe_lr": 1e-7}
    study_file = tiny_study(
        tmp_path, n_trials=4, pruner={"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
        fixed={"epochs": 4, "train_subset": 200, "test_subset": 100, "linear_probe_epochs": 5},
        space={"linear_probe_lr": {"type": "float", "low": 1e-7, "high": 0.1, "log": True}})
    study = optuna.create_study(study_name="tiny", storage=storage.open_storage(url), direction="maximize")
    for params in (good, good, bad, good):
        study.enqueue_trial(params)
    assert run_main(url, study_file, tmp_path / "art") == 0
    states = [t.state for t in load(url).trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    pruned = load(url).trials[2]
    assert len(pruned.intermediate_values) < 4 and pruned.user_attrs["stop_reason"] == "pruned"
    controls = {"untrained_baseline", "pca_baseline", "raw_patch_baseline", "pca_components"}
    assert controls <= set(record(load(url).trials[0])) and not controls & set(record(pruned))
    note = get_note(optuna.Trial(load(url), pruned._trial_id))
    epoch = max(pruned.intermediate_values)
    assert note.startswith(f"### Trial 2: pruned (the pruner stopped it after epoch {epoch})\n"), note


@pytest.mark.slow
def test_diverged_trial_keeps_its_probe_or_is_pruned_without_one_and_the_worker_goes_on(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study_file = tiny_study(tmp_path, n_trials=3, fixed={"w_grad_clip_norm": 1e30, "warmup_steps": 2},
                            space={"peak_lr_weights": {"type": "float", "low": 1e-4, "high": 1e8, "log": True}})
    study = optuna.create_study(study_name="tiny", storage=storage.open_storage(url), direction="maximize")
    for lr in (1e3, 1e8, 1e-3):  # diverges in epoch 2 after one probe; in epoch 1 before any; never
        study.enqueue_trial({"peak_lr_weights": lr})
    assert run_main(url, study_file, tmp_path / "art") == 0
    after_probe, before_probe, fine = load(url).trials
    assert after_probe.state == TrialState.COMPLETE and record(after_probe)["divergence_epoch"] == 2
    assert after_probe.value == after_probe.user_attrs["best_probe_accuracy"] == after_probe.intermediate_values[1]
    assert before_probe.state == TrialState.PRUNED and record(before_probe)["divergence_epoch"] == 1
    for diverged in (after_probe, before_probe):
        assert record(diverged)["diverged"] is True and diverged.user_attrs["stop_reason"] == "diverged"
        assert "non-finite" in record(diverged)["stop_detail"]
    assert fine.state == TrialState.COMPLETE and record(fine)["diverged"] is False


def test_out_of_memory_fails_the_trial_with_its_reason_and_the_worker_goes_on(tmp_path):
    spec = load_spec(tiny_study(tmp_path, n_trials=3))
    study = optuna.create_study(study_name="tiny", storage=storage.open_storage(f"sqlite:///{tmp_path}/s.db"),
                                direction="maximize")

    def objective_that_runs_out_of_memory_once(trial):
        if trial.number == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return 0.5

    assert run_worker(study, spec, objective_that_runs_out_of_memory_once) == 0
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].user_attrs["fail_reason"].startswith("CUDA out of memory")


def test_repeated_errors_stop_the_worker(tmp_path):
    spec = load_spec(tiny_study(tmp_path, n_trials=10))
    study = optuna.create_study(study_name="tiny", storage=storage.open_storage(f"sqlite:///{tmp_path}/s.db"))

    def broken(trial):
        raise ValueError("bug")

    assert run_worker(study, spec, broken) == 1
    assert [t.user_attrs["fail_reason"] for t in study.trials] == ["ValueError: bug"] * 3


@pytest.mark.slow
def test_two_workers_share_one_journal_file_within_the_budget(tmp_path):
    url = f"journal:///{tmp_path}/study.journal"
    study_file = tiny_study(tmp_path, n_trials=5, fixed={"epochs": 1})
    done, trained = run_workers_to_the_end(url, study_file, tmp_path, workers=2, trials_each=3)
    assert len(trained) == 5 and all(t.state == TrialState.COMPLETE for t in trained)
    assert all(t.state == TrialState.FAIL and "epochs_run" not in t.user_attrs for t in done if t not in trained)
    assert len({json.dumps(t.params, sort_keys=True) for t in trained}) == 5
    assert len({t.user_attrs["worker"] for t in trained}) == 2  # 3 trials at most each: both took part
    assert len({record(t)["sampler_seed"] for t in trained}) == 2  # each with its own sampler seed


def test_budget_check_after_ask_fails_surplus_trials(tmp_path):
    """Two workers counted 1 of 2 trials and asked at once: the one ranked beyond the budget trains nothing."""
    from studies.running.worker import next_trial

    spec = load_spec(tiny_study(tmp_path, n_trials=2))
    study = optuna.create_study(study_name="tiny", storage=storage.open_storage(f"sqlite:///{tmp_path}/s.db"))
    study.ask()
    ask = study.ask

    def another_worker_asks_first(*args, **kwargs):
        ask()
        return ask(*args, **kwargs)

    study.ask = another_worker_asks_first
    assert next_trial(study, spec) is None
    surplus = study.trials[2]
    assert surplus.state == TrialState.FAIL and surplus.system_attrs["pcvit:surplus"] is True
    assert "surplus" in surplus.user_attrs["fail_reason"]
    study.ask = ask
    assert next_trial(study, spec) is None and len(study.trials) == 3  # the count now stops it before asking


def test_the_default_pruner_waits_three_probes_without_improvement():
    """The default study's comment promises 3 probes (30 epochs): PatientPruner(patience=2) looks at patience + 1."""
    spec = load_spec(pathlib.Path(objective.__file__).parent / "studies/pcvit-12block.yaml")
    assert "only after 3 probes in a row (30 epochs)" in spec.text
    study = optuna.create_study(direction="maximize", pruner=spec.make_pruner())
    for i in range(10):  # ten finished trials that reached 0.5: the median to beat
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5, intermediate_values={
            e: 0.5 for e in range(10, 101, 10)}, params={}, distributions={}))
    trial = study.ask()
    prunes = []
    for epoch, accuracy in zip(range(10, 101, 10), [0.2, 0.3, 0.4, 0.35, 0.35, 0.35, 0.35]):
        trial.report(accuracy, epoch)
        prunes.append(trial.should_prune())
    # epoch 30 is the last improvement; 40, 50, 60 do not improve: pruned at 60, the third, not at 50
    assert prunes == [False, False, False, False, False, True, True]


def test_a_grid_study_runs_every_point_once_and_the_worker_ends_cleanly(tmp_path):
    """Optuna's GridSampler calls Study.stop() after the last point, which raises outside Study.optimize; the
    worker must store that trial, not start another (it would repeat a point), and exit 0."""
    url = f"sqlite:///{tmp_path}/s.db"
    study_file = tiny_study(tmp_path, n_trials=5, sampler={"type": "grid"}, fixed={"epochs": 1},
                            space={"hidden_momentum": {"type": "categorical", "choices": [0.3, 0.4]}})
    assert run_main(url, study_file, tmp_path / "art") == 0
    trials = load(url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert sorted(t.params["hidden_momentum"] for t in trials) == [0.3, 0.4]


@pytest.mark.slow
def test_two_worker_processes_run_every_grid_point_exactly_once(tmp_path):
    """Both workers shuffle the grid with the same seed: each grid id is one point everywhere,
    so the 12 trial numbers the storage hands out are the 12 points, none twice (per-worker seeds repeat some)."""
    url = f"sqlite:///{tmp_path}/s.db"
    space = {"hidden_momentum": {"type": "categorical", "choices": [0.3, 0.4, 0.5]},
             "peak_lr_hidden": {"type": "categorical", "choices": [0.05, 0.1]},
             "inference_steps": {"type": "categorical", "choices": [1, 2]}}
    study_file = tiny_study(tmp_path, n_trials=12, sampler={"type": "grid"}, space=space,
                            fixed={"epochs": 1, "linear_probe_epochs": 1})
    done, trained = run_workers_to_the_end(url, study_file, tmp_path, workers=2, trials_each=12)
    points = sorted(tuple(t.params[name] for name in space) for t in trained if t.state == TrialState.COMPLETE)
    assert points == sorted(itertools.product(*(p["choices"] for p in space.values())))  # each once, none missing
    assert len({t.user_attrs["worker"] for t in trained}) == 2  # both drew points
    assert len({record(t)["sampler_seed"] for t in trained}) == 2  # each worker its own seed, one grid order


def test_a_gp_study_runs_its_modelled_trials_in_the_worker(tmp_path, monkeypatch):
    """After its one start-up trial the GP sampler fits the finished trials: the worker's trials 2 and 3."""
    modelled = []
    sample_relative = optuna.samplers.GPSampler.sample_relative

    def counted(self, study, trial, search_space):
        params = sample_relative(self, study, trial, search_space)
        modelled.append(trial.number) if params else None
        return params

    monkeypatch.setattr(optuna.samplers.GPSampler, "sample_relative", counted)
    url = f"sqlite:///{tmp_path}/s.db"
    study_file = tiny_study(tmp_path, n_trials=3, sampler={"type": "gp", "n_startup_trials": 1},
                            fixed={"epochs": 1})
    assert run_main(url, study_file, tmp_path / "art") == 0
    study = load(url)
    assert modelled == [1, 2]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 3
