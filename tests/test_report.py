"""`pcvit-study report` answers the study's questions: effect of each parameter, divergence rate per value."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

import storage
from studies import cli
from studies.report import spearman
from studies.search import build_pruner, build_sampler
from studies.spec import load_spec
from studies.worker import join_study
from tests.helpers import tiny_study

SPACE = {
    "use_vode_state_layernorm": {"type": "categorical", "choices": [False, True]},
    "peak_lr_hidden": {"type": "float", "low": 0.05, "high": 0.11},
}
QUESTIONS = [{"question": "Does layer norm help?", "params": ["use_vode_state_layernorm"]}]


def trial(layernorm: bool, lr: float, value: float | None, diverged: bool = False, **system_attrs):
    state = TrialState.PRUNED if diverged else (TrialState.COMPLETE if value is not None else TrialState.FAIL)
    return create_trial(
        state=state, value=value if state == TrialState.COMPLETE else None,
        params={"use_vode_state_layernorm": layernorm, "peak_lr_hidden": lr},
        distributions={"use_vode_state_layernorm": CategoricalDistribution([False, True]),
                       "peak_lr_hidden": FloatDistribution(0.05, 0.11)},
        user_attrs={"diverged": diverged, "best_probe_accuracy": value if value is not None else 0.1},
        system_attrs=system_attrs)


def test_report_answers_the_questions_from_the_trials(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    spec = load_spec(tiny_study(tmp_path, n_trials=9, space=SPACE, questions=QUESTIONS))
    study = join_study(storage.open_storage(url), url, "tiny", spec, build_sampler(spec, 1), build_pruner(spec))
    for t in (trial(False, 0.05, 0.20), trial(False, 0.06, 0.22), trial(False, 0.07, 0.24),
              trial(True, 0.08, 0.40), trial(True, 0.09, 0.42), trial(True, 0.10, None, diverged=True),
              trial(True, 0.11, None, diverged=True),
              trial(True, 0.11, None),  # crashed, then retried: counted once, as its retry
              trial(False, 0.05, None, **{"pcvit:surplus": True})):  # beyond the budget: not counted
        study.add_trial(t)
    study.add_trial(trial(True, 0.11, 0.44, failed_trial=7, retry_history=[7]))
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "8 of 9 trials" in out and "diverged 2 (25%)" in out
    assert "best: trial 9, best_probe_accuracy = 0.44" in out
    assert "Q1. Does layer norm help?" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith(("False", "True"))}
    assert rows["False"][1:5] == ["3", "3", "0", "0"] and rows["False"][5] == "0%"
    assert rows["True"][1:5] == ["5", "3", "2", "0"] and rows["True"][5] == "40%"  # 2 of 5 diverged
    assert "best mean best_probe_accuracy: True" in out
    assert "Spearman rank correlation with best_probe_accuracy: +1.00 (n = 6)" in out


def test_report_of_a_missing_study_is_a_clear_error(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(storage=storage.open_storage(url), study_name="other")
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 1
    assert "study 'tiny'" in capsys.readouterr().err
    assert cli.main(["reap", "--storage", url, "--study-name", "other"]) == 1
    assert "no stored study file" in capsys.readouterr().err


@pytest.mark.parametrize(("pairs", "rho"), [
    ([(1, 1), (2, 2), (3, 3)], 1.0), ([(1, 3), (2, 2), (3, 1)], -1.0), ([(1, 1), (2, 1), (3, 1)], None),
    ([(1, 2), (2, 2), (3, 4), (4, 4)], 0.8944),
])
def test_spearman(pairs, rho):
    assert spearman(pairs) == (pytest.approx(rho, abs=1e-4) if rho is not None else None)
