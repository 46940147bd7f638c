"""W&B: importing the original sweep (nothing silently dropped) and logging trials as offline W&B runs."""

from __future__ import annotations

import json
import struct

import pytest
import yaml

from studies import cli
from studies.studyfile.spec import NO_EFFECT, StudyFileError, load_spec
from studies.studyfile.wandb_import import import_sweep
from tests.helpers import REPO, finish, start_worker, tiny_study, trials, worker_env
from studies.running.records import record

SWEEP = REPO / "tests/data/sweep_12block_comprehensive.yaml"


def original_sweep() -> dict:
    return yaml.safe_load(SWEEP.read_text())


def imported(sweep: dict, **kwargs) -> tuple[dict, list[str]]:
    notes: list[str] = []
    return import_sweep(sweep, "sweep.yaml", note=notes.append, **kwargs), notes


def test_original_sweep_imports_to_the_shipped_wandb_study(tmp_path, capsys):
    out = tmp_path / "study.yaml"
    assert cli.main(["import-wandb", str(SWEEP), "-o", str(out)]) == 0
    made, shipped = load_spec(out), load_spec(REPO / "studies/pcvit-12block-wandb.yaml")
    for key in ("direction", "metric", "sampler", "n_trials", "fixed", "space"):
        assert made.document[key] == shipped.document[key], key
    assert made.fixed["linear_probe_vode_indices"] == [0]  # "0" in the sweep
    assert made.space["peak_lr_hidden"]["choices"] == [0.05, 0.07, 0.08, 0.085, 0.09, 0.095, 0.1, 0.11]
    notes = capsys.readouterr().err
    for name in ("corrupt_ratio", "use_lower_half_mask", "inference_clamp_alpha", "save_reconstruction_video",
                 "video_fps", "linear_probe_concatenate_features", "linear_probe_use_gap", "config",
                 "model_saving_metric", "save_model_train_mse_threshold"):
        assert f"dropped parameters.{name}:" in notes, name
    assert "used count: 500 as n_trials" in notes and "pruner none" in notes


def test_every_dropped_key_gets_its_own_note():
    study, notes = imported(original_sweep())
    dropped = [n for n in notes if n.startswith("dropped")]
    assert len(dropped) == len([k for k in original_sweep()["parameters"] if k in NO_EFFECT])
    assert not set(NO_EFFECT) & (set(study["fixed"]) | set(study["space"]))


@pytest.mark.parametrize(("entry", "expected"), [
    ({"value": 3}, ("fixed", 3)),
    ({"values": [16]}, ("fixed", 16)),
    ({"min": 0.05, "max": 0.11}, ("space", {"type": "float", "low": 0.05, "high": 0.11})),
    ({"min": 0.05, "max": 0.11, "distribution": "uniform"}, ("space", {"type": "float", "low": 0.05, "high": 0.11})),
    ({"min": 1e-4, "max": 1e-2, "distribution": "log_uniform_values"},
     ("space", {"type": "float", "low": 1e-4, "high": 1e-2, "log": True})),
    ({"min": 0.05, "max": 0.1, "distribution": "q_uniform", "q": 0.01},
     ("space", {"type": "float", "low": 0.05, "high": 0.1, "step": 0.01})),
])
def test_parameter_forms(entry, expected):
    name = "num_blocks" if expected[0] == "fixed" and expected[1] == 3 else "peak_lr_hidden"
    name = "hidden_size" if expected == ("fixed", 16) else name
    sweep = {"method": "random", "metric": {"name": "best_probe_accuracy", "goal": "maximize"}, "run_cap": 4,
             "parameters": {name: entry}}
    study, _ = imported(sweep)
    kind, value = expected
    assert (study["fixed"] if kind == "fixed" else study["space"])[name] == value


def test_int_range_and_grid_budget():
    sweep = {"method": "grid", "metric": {"name": "best_probe_accuracy", "goal": "maximize"},
             "parameters": {"hidden_size": {"values": [16, 32]}, "num_heads": {"values": [1, 2, 4]}}}
    study, _ = imported(sweep)
    assert study["sampler"] == {"type": "grid"} and study["n_trials"] == 6
    sweep = {"method": "random", "metric": {"name": "best_probe_accuracy", "goal": "maximize"},
             "parameters": {"warmup_steps": {"min": 0, "max": 200}}}
    study, _ = imported(sweep, n_trials=9)
    assert study["space"]["warmup_steps"] == {"type": "int", "low": 0, "high": 200} and study["n_trials"] == 9


@pytest.mark.parametrize(("change", "words"), [
    ({"method": "hyperopt"}, "method: 'hyperopt' is not a W&B sweep method"),
    ({"parameters": {"dropout": {"value": 0.1}}}, "parameters.dropout: unknown parameter"),
    ({"parameters": {"peak_lr_hidden": {"distribution": "normal", "mu": 0.1, "sigma": 0.01}}},
     "parameters.peak_lr_hidden.mu"),
    ({"parameters": {"hidden_size": {"values": [64, 96], "probabilities": [0.5, 0.5]}}},
     "parameters.hidden_size.probabilities"),
    ({"parameters": {"peak_lr_hidden": {"min": 0.1, "max": 0.2, "distribution": "q_log_uniform_values"}}},
     "q_log_uniform_values"),
    ({"parameters": {"early_stopping_metric": {"value": "val_loss"}}}, "must be one of train_mse, val_mse"),
    ({"early_terminate": {"type": "hyperband", "s": 2}}, "early_terminate.s"),
    ({"metric": {"name": "val_loss", "goal": "minimize"}}, "metric.name"),
    ({"controller": {"type": "local"}}, "controller: unknown W&B sweep key"),
])
def test_what_cannot_be_expressed_is_an_error(change, words):
    sweep = {"method": "random", "metric": {"name": "best_probe_accuracy", "goal": "maximize"}, "run_cap": 3,
             "parameters": {"hidden_size": {"values": [64, 96]}}}
    sweep.update(change)
    with pytest.raises(StudyFileError, match="sweep.yaml") as info:
        imported(sweep)
    assert words in str(info.value)


BAYES = {"method": "bayes", "metric": {"name": "best_probe_accuracy", "goal": "maximize"}, "run_cap": 20}


def test_bayes_over_numeric_ranges_imports_as_the_gp_sampler_with_one_note_saying_why():
    sweep = {**BAYES, "parameters": {
        "peak_lr_hidden": {"distribution": "uniform", "min": 0.085, "max": 0.105},
        "intermediate_l1_coeff": {"distribution": "log_uniform_values", "min": 5e-5, "max": 2e-4},
        "h_grad_clip_norm": {"distribution": "q_uniform", "min": 1500, "max": 2500, "q": 500},
        "seed": {"values": [10, 42]}}}
    study, notes = imported(sweep)
    assert study["sampler"] == {"type": "gp"}
    said = [n for n in notes if n.startswith("method bayes")]
    assert len(said) == 1 and "sampler gp" in said[0] and "3 numeric range(s) and 1 categorical" in said[0]


def test_bayes_over_mostly_categorical_choices_imports_as_tpe_with_the_reason():
    sweep = {**BAYES, "parameters": {
        "peak_lr_hidden": {"distribution": "uniform", "min": 0.085, "max": 0.105},
        "hidden_size": {"values": [64, 96, 128]}, "num_heads": {"values": [1, 2]}}}
    study, notes = imported(sweep)
    assert study["sampler"] == {"type": "tpe"}
    said = [n for n in notes if n.startswith("method bayes")]
    assert len(said) == 1 and "TPE, not GP" in said[0] and "hidden_size, num_heads" in said[0]


def test_a_conditional_parameter_makes_the_model_based_choice_tpe():
    from studies.studyfile.samplers import model_based_sampler

    space = {"peak_lr_hidden": {"type": "float", "low": 0.05, "high": 0.1},
             "intermediate_l1_coeff": {"type": "zero_or_log", "low": 1e-5, "high": 1e-2}}
    sampler, why = model_based_sampler(space)
    assert sampler == {"type": "tpe"} and "intermediate_l1_coeff exist only in some trials" in why
    del space["intermediate_l1_coeff"]
    assert model_based_sampler(space)[0] == {"type": "gp"}


def test_a_bayes_sweep_with_a_parameter_no_sampler_can_model_is_refused_in_one_line_writing_nothing(
        tmp_path, capsys):
    sweep = tmp_path / "bayes.yaml"
    sweep.write_text(yaml.safe_dump({**BAYES, "parameters": {
        "peak_lr_hidden": {"distribution": "normal", "mu": 0.1, "sigma": 0.01}}}))
    out = tmp_path / "study.yaml"
    assert cli.main(["import-wandb", str(sweep), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parameters.peak_lr_hidden.mu: cannot be expressed" in err[0] and "normal" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("kind", ["gp", "tpe"])
def test_study_files_take_model_based_samplers_seeded_per_worker(kind, tmp_path):
    import optuna

    from studies.studyfile.spec import load_spec as load_study_file

    spec = load_study_file(tiny_study(tmp_path, sampler={"type": kind, "n_startup_trials": 2}))
    expected = {"gp": optuna.samplers.GPSampler, "tpe": optuna.samplers.TPESampler}[kind]

    def first_draws(seed):
        sampler = spec.make_sampler(seed)
        assert isinstance(sampler, expected)
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=4)  # 2 at random, then modelled
        return [t.params["x"] for t in study.trials]

    assert first_draws(1) == first_draws(1) and first_draws(1) != first_draws(2)  # the worker's seed decides
    bad = tiny_study(tmp_path, name="bad", sampler={"type": kind, "seed": 3})
    with pytest.raises(StudyFileError, match="sampler.seed: not allowed"):
        load_study_file(bad)
    bad = tiny_study(tmp_path, name="bad", sampler={"type": kind, "n_ei_candidates": 3})
    with pytest.raises(StudyFileError, match="sampler.n_ei_candidates: unknown key"):
        load_study_file(bad)


def test_hyperband_early_termination_becomes_the_pruner():
    sweep = {"method": "random", "metric": {"name": "best_probe_accuracy", "goal": "maximize"}, "run_cap": 3,
             "early_terminate": {"type": "hyperband", "min_iter": 3, "eta": 2},
             "parameters": {"hidden_size": {"values": [64, 96]}}}
    study, _ = imported(sweep)
    assert study["pruner"] == {"type": "hyperband", "min_resource": 3, "reduction_factor": 2}


@pytest.mark.slow
def test_trial_is_logged_as_an_offline_wandb_run(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = tiny_study(tmp_path, n_trials=1)
    env = worker_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    log = tmp_path / "worker.log"
    worker = start_worker(url, study, tmp_path / "art", log, "--wandb", "pcvit-tests", env=env)
    assert finish(worker, 240, log) == 0, log.read_text()[-3000:]
    (trial,) = trials(url, "tiny")
    run_id = record(trial)["wandb_run_id"]
    assert trial.user_attrs["wandb_url"] == f"offline: run {run_id}"
    assert str(tmp_path / "wandb") in record(trial)["wandb_dir"]  # what `wandb sync` needs
    (log_file,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = list(wandb_records(log_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.run_group, run.display_name) == (run_id, "tiny", "trial-0")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["params"] == trial.params and config["hidden_size"] == 8
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["probe_accuracy"] for h in history] == pytest.approx(list(trial.intermediate_values.values()))
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
    assert summary["best_probe_accuracy"] == pytest.approx(trial.value)
    assert summary["best_probe_accuracy"] == pytest.approx(max(trial.intermediate_values.values()))


def wandb_records(path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log after a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if room < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record, MIDDLE/LAST add
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
