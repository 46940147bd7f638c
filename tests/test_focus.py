"""`pcvit-study focus`: the follow-up study around the best trials of a first one."""

from __future__ import annotations

import math

import numpy
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

import storage
from studies import cli
from studies.results.focus import narrowed
from studies.running.worker import join_study
from studies.studyfile.spec import load_spec
from tests.helpers import tiny_study

SPACE = {
    "peak_lr_hidden": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
    "inference_steps": {"type": "int", "low": 1, "high": 8},
    "hidden_momentum": {"type": "categorical", "choices": [0.2, 0.4, 0.6]},
    "linear_probe_lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
}
DISTRIBUTIONS = {"peak_lr_hidden": FloatDistribution(0.01, 0.2, log=True), "inference_steps": IntDistribution(1, 8),
                 "hidden_momentum": CategoricalDistribution([0.2, 0.4, 0.6]),
                 "linear_probe_lr": FloatDistribution(1e-3, 1e-1, log=True)}


def first_study(tmp_path, n: int = 16):
    """Trials whose value peaks at peak_lr_hidden ~ 0.05, momentum 0.4, more steps; linear_probe_lr does nothing."""
    url = f"sqlite:///{tmp_path}/s.db"
    spec = load_spec(tiny_study(tmp_path, space=SPACE, n_trials=40))
    study = join_study(storage.open_storage(url), url, "tiny", spec, sampler_seed=1)[0]
    rng = numpy.random.default_rng(3)
    for _ in range(n):
        params = {"peak_lr_hidden": float(math.exp(rng.uniform(math.log(0.01), math.log(0.2)))),
                  "inference_steps": int(rng.integers(1, 9)), "hidden_momentum": [0.2, 0.4, 0.6][rng.integers(0, 3)],
                  "linear_probe_lr": float(math.exp(rng.uniform(math.log(1e-3), math.log(1e-1))))}
        value = (1 - abs(math.log(params["peak_lr_hidden"] / 0.05)) / 3 + (params["hidden_momentum"] == 0.4) * 0.5
                 + params["inference_steps"] / 40)
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params=params,
                                     distributions=DISTRIBUTIONS))
    return url, study


def test_focus_narrows_around_the_best_trials_and_seeds_the_follow_up(tmp_path, capsys):
    url, study = first_study(tmp_path)
    out = tmp_path / "focus.yaml"
    assert cli.main(["focus", "--storage", url, "--study-name", "tiny", "--n-trials", "10", "-o", str(out),
                     "--into", "tiny-focus"]) == 0
    document = yaml.safe_load(out.read_text())
    best = sorted(study.trials, key=lambda t: t.value, reverse=True)[:4]  # the top quarter of 16
    assert document["focused_from"] == {"study": "tiny", "trials": [t.number for t in best]}
    assert document["n_trials"] == 10 and document["sampler"]["type"] in ("gp", "tpe")
    for name in ("peak_lr_hidden", "inference_steps"):
        if name in document["space"]:  # (or fixed, if PED-ANOVA found it unimportant)
            p = document["space"][name]
            assert SPACE[name]["low"] <= p["low"] <= min(t.params[name] for t in best)
            assert max(t.params[name] for t in best) <= p["high"] <= SPACE[name]["high"]
            assert p["high"] - p["low"] < SPACE[name]["high"] - SPACE[name]["low"]
    momentum = document["space"].get("hidden_momentum", {"choices": [document["fixed"].get("hidden_momentum")]})
    assert set(momentum["choices"]) == {t.params["hidden_momentum"] for t in best}
    load_spec(out)  # a valid study file
    follow = optuna.load_study(study_name="tiny-focus", storage=storage.open_storage(url))
    waiting = follow.get_trials(states=(TrialState.WAITING,))
    assert 1 <= len(waiting) <= 4  # the best trials run first (those that differ only in a fixed param: once)
    assert f"created study 'tiny-focus' and enqueued {len(waiting)} trials" in capsys.readouterr().out
    searched = set(document["space"])
    assert all(set(t.system_attrs["fixed_params"]) == searched for t in waiting)  # only what is still searched
    assert cli.main(["report", "--storage", url, "--study-name", "tiny-focus"]) == 0
    assert f"Focused from study 'tiny': its best trials {[t.number for t in best]}" in capsys.readouterr().out


def test_focus_refuses_a_study_with_too_few_finished_trials_and_writes_nothing(tmp_path, capsys):
    url, _ = first_study(tmp_path, n=5)
    out = tmp_path / "focus.yaml"
    assert cli.main(["focus", "--storage", url, "--study-name", "tiny", "--n-trials", "10", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "5 finished trial(s)" in err and "at least 8" in err
    assert not out.exists()


@pytest.mark.parametrize("param, values, expected", [
    ({"type": "categorical", "choices": [1, 2, 3]}, [2, 2], ("fixed", 2)),
    ({"type": "categorical", "choices": [1, 2, 3]}, [3, 1], ("space", {"type": "categorical", "choices": [1, 3]})),
    ({"type": "zero_or_log", "low": 1e-4, "high": 1e-1}, [0.0, 0.0], ("fixed", 0.0)),
    ({"type": "float", "low": 0.0, "high": 1.0}, [0.4, 0.6], ("space", {"type": "float", "low": 0.38, "high": 0.62})),
    ({"type": "int", "low": 1, "high": 20, "step": 2}, [5, 9], ("space", {"type": "int", "low": 3, "high": 10,
                                                                          "step": 2})),
])
def test_one_parameter_narrows_as_documented(param, values, expected):
    where, value = narrowed("x", param, values)
    assert where == expected[0]
    if isinstance(value, dict):
        assert value.keys() == expected[1].keys()
        assert all(v == pytest.approx(expected[1][k]) for k, v in value.items())
    else:
        assert value == expected[1]


@pytest.mark.slow
def test_a_real_study_focuses_and_its_follow_up_runs_the_best_trials_first(tmp_path, capsys):
    import objective

    url, art = f"sqlite:///{tmp_path}/s.db", str(tmp_path / "art")
    space = {"peak_lr_hidden": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
             "linear_probe_lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}
    first = tiny_study(tmp_path, space=space, n_trials=8, fixed={"epochs": 1}, controls=False)
    assert objective.main(["--storage", url, "--study-file", str(first), "--artifact-dir", art]) == 0
    out = tmp_path / "focus.yaml"
    assert cli.main(["focus", "--storage", url, "--study-name", "tiny", "--n-trials", "3", "-o", str(out),
                     "--into", "tiny-focus"]) == 0
    assert objective.main(["--storage", url, "--study-name", "tiny-focus", "--artifact-dir", art]) == 0
    follow = optuna.load_study(study_name="tiny-focus", storage=storage.open_storage(url))
    assert [t.state for t in follow.trials] == [TrialState.COMPLETE] * 3
    best = yaml.safe_load(out.read_text())["focused_from"]["trials"]
    first_params = {t.number: t.params for t in optuna.load_study(study_name="tiny", storage=url).trials}
    searched = set(yaml.safe_load(out.read_text())["space"])
    enqueued = [{k: first_params[n][k] for k in searched} for n in best]
    assert {k: follow.trials[0].params[k] for k in searched} in enqueued  # a best trial ran first
