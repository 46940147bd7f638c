"""Study files: the shipped ones are valid, and every kind of bad file fails loudly, naming file and key."""

from __future__ import annotations

import pathlib

import pytest
import yaml

import objective
from studies import cli
from studies.studyfile.spec import NO_EFFECT, StudyFileError, load_spec, parse_spec, spec_diff
from tests.helpers import REPO, TINY_FIXED, TINY_SPACE

SHIPPED = sorted((REPO / "studies").glob("*.yaml"))


def document(**changes):
    doc = {"name": "t", "direction": "maximize", "metric": "best_probe_accuracy", "n_trials": 5,
           "fixed": dict(TINY_FIXED), "space": dict(TINY_SPACE)}
    doc.update(changes)
    if "fixed" not in changes:  # a sampled parameter leaves the tiny study's fixed settings
        doc["fixed"] = {k: v for k, v in doc["fixed"].items() if k not in doc["space"]}
    return doc


def error_of(doc) -> str:
    """The error of a bad study file, checked as the commands check it (schema, configs, sampler and pruner)."""
    with pytest.raises(StudyFileError) as info:
        parse_spec(yaml.safe_dump(doc, sort_keys=False), "bad.yaml")
    return str(info.value)


def test_the_three_shipped_study_files_are_valid():
    assert {p.name for p in SHIPPED} >= {"pcvit-12block.yaml", "pcvit-12block-wandb.yaml", "smoke.yaml"}
    for path in SHIPPED:
        spec = load_spec(path)
        assert spec.n_trials >= 1 and spec.space


def test_default_study_has_the_documents_ranges():
    spec = load_spec(REPO / "studies/pcvit-12block.yaml")
    space, fixed = spec.space, spec.fixed
    assert (spec.n_trials, spec.direction, spec.metric, spec.sampler) == (500, "maximize", "best_probe_accuracy",
                                                                          {"type": "random"})
    assert fixed["num_blocks"] == 12 and fixed["epochs"] == 100
    assert space["hidden_size"]["choices"] == [64, 96, 128] and space["num_heads"]["choices"] == [1, 2, 4]
    assert space["batch_size"]["choices"] == [128, 200, 256]
    assert (space["peak_lr_hidden"]["low"], space["peak_lr_hidden"]["high"]) == (0.05, 0.11)
    assert space["peak_lr_weights"] == {"type": "float", "low": 0.0005, "high": 0.003, "log": True}
    assert (space["inference_lr_scale_base"]["low"], space["inference_lr_scale_base"]["high"]) == (1.15, 1.35)
    assert (space["h_grad_clip_norm"]["low"], space["h_grad_clip_norm"]["high"]) == (1000, 5000)
    assert (space["w_grad_clip_norm"]["low"], space["w_grad_clip_norm"]["high"]) == (300, 1500)
    assert space["use_vode_state_layernorm"]["choices"] == [False, True]
    assert space["intermediate_l1_coeff"]["type"] == "zero_or_log"
    assert space["early_stopping_patience"]["choices"] == [15, 20, 25]
    assert space["validation_every_n_epochs"]["choices"] == [5, 10, 15]
    assert fixed["linear_probe_every_n_epochs"] == 10 and fixed["linear_probe_epochs"] == 10  # "quick 10-epoch probes"
    assert len(spec.questions) == 5


@pytest.mark.parametrize(("changes", "key", "words"), [
    ({"space": {"not_a_field": {"type": "float", "low": 0, "high": 1}}}, "space.not_a_field", "unknown parameter"),
    ({"fixed": {**TINY_FIXED, "corrupt_ratio": 0.25}}, "fixed.corrupt_ratio", "no effect"),
    ({"space": {"peak_lr_hidden": {"type": "float", "low": 0.2, "high": 0.1}}}, "space.peak_lr_hidden", "empty range"),
    ({"space": {"num_heads": {"type": "categorical", "choices": []}}}, "space.num_heads.choices", "empty"),
    ({"space": {"peak_lr_hidden": {"type": "float", "low": "fast", "high": 0.1}}}, "space.peak_lr_hidden.low",
     "expected number"),
    ({"space": {"warmup_steps": {"type": "float", "low": 0, "high": 5}}}, "space.warmup_steps.type", "use type int"),
    ({"space": {"peak_lr_weights": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}},
     "space.peak_lr_weights.low", "low > 0"),
    ({"space": {"num_heads": {"type": "categorical", "choices": [1, 3]}}}, "space.num_heads", "not divisible"),
    ({"space": {"hidden_size": {"type": "categorical", "choices": [8, 12]},
                "num_heads": {"type": "categorical", "choices": [1, 8]}}}, "space.num_heads", "not divisible"),
    ({"space": {"batch_size": {"type": "categorical", "choices": [50, "big"]}}}, "space.batch_size.choices[1]",
     "expected int"),
    ({"sampler": {"type": "cmaes"}}, "sampler.type", "unknown sampler"),
    ({"sampler": {"type": "random", "seed": 1}}, "sampler.seed", "every worker seeds its own"),
    ({"pruner": {"type": "wilcoxon"}}, "pruner.type", "unknown pruner"),
    ({"pruner": {"type": "median", "n_warmup": 3}}, "pruner.n_warmup", "unknown key"),
    ({"pruner": {"type": "percentile", "percentile": 150}}, "pruner", "percentile"),
    ({"direction": "up"}, "direction", "maximize or minimize"),
    ({"metric": "accuracy"}, "metric", "unknown metric"),
    ({"n_trials": 0}, "n_trials", ">= 1"),
    ({"heartbeat_interval": 10, "grace_period": 5}, "grace_period", "must exceed heartbeat_interval"),
    ({"fixed": {**TINY_FIXED, "peak_lr_hidden": 0.1}}, "space.peak_lr_hidden", "either sampled or fixed"),
    ({"count": 500}, "count", "unknown key"),
    ({"sampler": {"type": "grid"}}, "space.peak_lr_hidden.type", "grid sampler needs categorical"),
])
def test_bad_study_file_names_file_and_key(changes, key, words):
    message = error_of(document(**changes))
    assert message.startswith("bad.yaml: ")
    assert f" {key}" in message and words in message, message


def test_every_no_effect_key_of_the_original_is_an_error():
    for name in NO_EFFECT:
        message = error_of(document(fixed={**TINY_FIXED, name: 1}))
        assert f"fixed.{name}" in message and "no effect" in message


def test_config_checks_every_value_and_pair_before_the_study_starts():
    # 3 is fine for hidden_size 12 but not 8: only the pair check sees it
    ok = document(fixed={**TINY_FIXED, "hidden_size": 12}, space={"num_heads": {"type": "categorical",
                                                                               "choices": [1, 3]}})
    parse_spec(yaml.safe_dump(ok), "ok.yaml")
    message = error_of(document(space={"hidden_size": {"type": "categorical", "choices": [12, 8]},
                                       "num_heads": {"type": "categorical", "choices": [1, 3]}}))
    assert "space.num_heads" in message and "hidden_size = 8" in message


def test_zero_or_log_and_numeric_text_are_understood():
    doc = document(space={"intermediate_l1_coeff": {"type": "zero_or_log", "low": "1e-5", "high": "1e-2"}})
    spec = parse_spec(yaml.safe_dump(doc), "x.yaml")
    assert spec.space["intermediate_l1_coeff"] == {"type": "zero_or_log", "low": 1e-5, "high": 1e-2}


def test_diff_names_every_changed_key():
    a = document()
    b = document(n_trials=7, space={**TINY_SPACE, "hidden_momentum": {"type": "float", "low": 0.3, "high": 0.6}})
    lines = spec_diff(a, b)
    assert "n_trials: stored 5, this file 7" in lines
    assert "space.hidden_momentum.high: stored 0.5, this file 0.6" in lines


def test_validate_command_exit_codes(tmp_path, capsys):
    assert cli.main(["validate", str(REPO / "studies/smoke.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document(space={"not_a_field": {"type": "float", "low": 0, "high": 1}})))
    assert cli.main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "space.not_a_field" in err


def test_worker_with_a_bad_file_exits_nonzero_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document(space={"peak_lr_hidden": {"type": "float", "low": 1, "high": 0.5}})))
    db = tmp_path / "s.db"
    code = objective.main(["--storage", f"sqlite:///{db}", "--study-file", str(bad),
                           "--artifact-dir", str(tmp_path / "art")])
    assert code == 2
    assert "space.peak_lr_hidden" in capsys.readouterr().err
    assert not db.exists() and not (tmp_path / "art").exists()


def test_missing_study_file_is_a_clear_error(tmp_path):
    with pytest.raises(StudyFileError, match="cannot read the study file"):
        load_spec(pathlib.Path(tmp_path / "nope.yaml"))


def test_worker_with_a_missing_dataset_exits_nonzero_and_writes_nothing(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    missing = tmp_path / "no-such-folder"
    study.write_text(yaml.safe_dump(document(fixed={**TINY_FIXED, "dataset": "fashion-mnist", "hidden_size": 16,
                                                    "data_dir": str(missing)})))
    db = tmp_path / "s.db"
    assert objective.main(["--storage", f"sqlite:///{db}", "--study-file", str(study)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not db.exists()


def test_worker_with_a_bad_storage_url_exits_nonzero(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(document()))
    assert objective.main(["--storage", f"sqlite:///{tmp_path}/missing/s.db", "--study-file", str(study)]) == 2
    assert f"{tmp_path}/missing/ does not exist" in capsys.readouterr().err


SILENT_CHANGES = [  # (study file text edit, key, words): each would change the search without a word
    (lambda doc: {**doc, "space": {**TINY_SPACE, "peak_lr_hidden": {"type": "float", "low": 0.05, "high": 0.11,
                                                                     "step": 0.04}}},
     "space.peak_lr_hidden.step", "0.04 does not divide the range [0.05, 0.11]"),
    (lambda doc: {**doc, "fixed": {k: v for k, v in doc["fixed"].items() if k != "inference_steps"},
                  "space": {**TINY_SPACE, "inference_steps": {"type": "int", "low": 2, "high": 9, "step": 3}}},
     "space.inference_steps.step", "3 does not divide the range [2, 9]"),
    (lambda doc: {**doc, "fixed": {**doc["fixed"], "linear_probe_every_n_epochs": 0}},
     "fixed.linear_probe_every_n_epochs", "0 turns the linear probe off"),
    (lambda doc: {**doc, "fixed": {**doc["fixed"], "linear_probe_every_n_epochs": 5}},
     "fixed.linear_probe_every_n_epochs", "5 probes after the last epoch (3)"),
    (lambda doc: {**doc, "space": {**TINY_SPACE, "peak_lr_hidden": {"type": "floot", "low": 0.05, "high": 0.11}}},
     "space.peak_lr_hidden.type", "unknown type 'floot'"),
]


@pytest.mark.parametrize(("edit", "key", "words"), SILENT_CHANGES)
def test_search_changes_are_refused_by_the_worker_before_anything_is_written(edit, key, words, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(edit(document()), sort_keys=False))
    db = tmp_path / "s.db"
    assert objective.main(["--storage", f"sqlite:///{db}", "--study-file", str(bad),
                           "--artifact-dir", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pcvit-worker: error: {bad}: {key}: ") and words in err, err
    assert err.count("\n") == 1 and not db.exists() and not (tmp_path / "art").exists()


def test_a_key_written_twice_is_refused_with_both_values(tmp_path, capsys):
    text = yaml.safe_dump(document(n_trials=60), sort_keys=False) + "n_trials: 600\n"
    line = text.splitlines().index("n_trials: 60") + 1
    with pytest.raises(StudyFileError, match=rf"bad.yaml: not valid YAML: n_trials: written twice, '60' on line "
                                             rf"{line} and '600' on line {text.count(chr(10))}"):
        parse_spec(text, "bad.yaml")
    nested = "space:\n  peak_lr_hidden: {type: float, low: 0.05, high: 0.11, low: 0.07}\n"
    with pytest.raises(StudyFileError, match=r"space.peak_lr_hidden.low: written twice, '0.05' on line 2 and '0.07'"):
        parse_spec(nested, "bad.yaml")


def test_default_study_samples_the_documents_warmup_range():
    space = load_spec(REPO / "studies/pcvit-12block.yaml").space
    assert space["warmup_steps"] == {"type": "int", "low": 0, "high": 200}


@pytest.mark.parametrize("n", ["0", "-1", "two"])
def test_worker_refuses_fewer_than_one_trial_before_anything_is_written(n, tmp_path, capsys):
    db = tmp_path / "s.db"
    with pytest.raises(SystemExit) as info:
        objective.main(["--storage", f"sqlite:///{db}", "--study-file", str(REPO / "studies/smoke.yaml"),
                        "--n-trials", n])
    assert info.value.code == 2 and "--n-trials: " in capsys.readouterr().err and not db.exists()


def test_every_top_level_key_reads_as_an_attribute_of_the_spec():
    from studies.studyfile.spec import TOP_LEVEL

    spec = load_spec(REPO / "studies/pcvit-12block.yaml")
    assert {key: getattr(spec, key) for key in spec.document} == spec.document
    assert all(hasattr(spec, key) for key in TOP_LEVEL)  # the optional ones too (baseline, controls)
    assert spec.controls is True and "controls" not in spec.document  # the default, left out of the document
    with pytest.raises(AttributeError):
        spec.n_trails  # noqa: B018 - a misspelt key is an error, not a silent None


def test_workers_seeded_differently_run_every_grid_point_once(tmp_path):
    """Grid ids are shared through the storage: every worker must map an id to the same point."""
    import optuna

    from storage.optuna_access import optimize_loop

    grid = {"hidden_size": {"type": "categorical", "choices": [32, 64]},
            "inference_steps": {"type": "categorical", "choices": [1, 2, 3]}}
    spec = parse_spec(yaml.safe_dump(document(space=grid, sampler={"type": "grid"}, n_trials=6)), "grid.yaml")
    url = f"sqlite:///{tmp_path}/g.db"
    optuna.create_study(study_name="g", storage=url, direction="maximize")
    workers = [optuna.load_study(study_name="g", storage=url, sampler=spec.make_sampler(seed)) for seed in (1, 2, 3)]
    points = []
    for i in range(6):  # the workers take turns, as concurrent workers do
        trial = workers[i % 3].ask()
        points.append((trial.suggest_categorical("hidden_size", [32, 64]),
                       trial.suggest_categorical("inference_steps", [1, 2, 3])))
        with optimize_loop(workers[i % 3]):  # as the worker tells: the grid's last point calls Study.stop()
            workers[i % 3].tell(trial, 0.0)
    assert sorted(points) == sorted((h, t) for h in (32, 64) for t in (1, 2, 3))


def test_a_gaussian_process_sampler_is_accepted_and_its_options_checked():
    import optuna

    spec = parse_spec(yaml.safe_dump(document(sampler={"type": "gp", "n_startup_trials": 4})), "gp.yaml")
    assert isinstance(spec.make_sampler(7), optuna.samplers.GPSampler)
    assert "sampler.n_startup_trials" in error_of(document(sampler={"type": "gp", "n_startup_trials": "four"}))
