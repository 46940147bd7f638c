"""`pcvit-study report`: honest answers from all trials (pruned ones too), targets, compute, markdown and JSON."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

import storage
from studies import cli
from studies.results.report_stats import quartiles, rank_sum_p, spearman
from studies.studyfile.spec import load_spec
from studies.running.worker import join_study
from tests.helpers import tiny_study, worker_env

SPACE = {
    "use_vode_state_layernorm": {"type": "categorical", "choices": [False, True]},
    "peak_lr_hidden": {"type": "float", "low": 0.05, "high": 0.11},
}
QUESTIONS = [{"question": "Does layer norm help?", "params": ["use_vode_state_layernorm"]}]
STUDY_CLI = str(pathlib.Path(sys.executable).parent / "pcvit-study")


def trial(layernorm: bool, lr: float, probes: list[float], state=TrialState.COMPLETE, diverged=False,
          device="cuda:0", **system_attrs):
    best = max(probes) if probes else None
    return create_trial(
        state=state, value=best if state == TrialState.COMPLETE else None,
        params={"use_vode_state_layernorm": layernorm, "peak_lr_hidden": lr},
        distributions={"use_vode_state_layernorm": CategoricalDistribution([False, True]),
                       "peak_lr_hidden": FloatDistribution(0.05, 0.11)},
        intermediate_values={10 * (i + 1): p for i, p in enumerate(probes)},
        user_attrs={"diverged": diverged, "best_probe_accuracy": best if best is not None else 0.0,
                    "best_train_mse": 0.004 if best and best > 0.3 else 0.02, "wall_time_s": 1800.0,
                    "device": device},
        system_attrs=system_attrs)


def make_study(tmp_path, trials, n_trials=20, dataset="cifar10"):
    url = f"sqlite:///{tmp_path}/s.db"
    spec = load_spec(tiny_study(tmp_path, n_trials=n_trials, space=SPACE, questions=QUESTIONS,
                                fixed={"dataset": dataset},
                                baseline={"value": 0.30, "label": "the 6-block best"}))
    study = join_study(storage.open_storage(url), url, "tiny", spec, sampler_seed=1)[0]
    for t in trials:
        study.add_trial(t)
    return url, study


def pruning_biased_trials():
    """Without layer norm: one lucky completed trial (0.36) and seven pruned early (0.10-0.16); with it: eight
    completed around 0.25. A mean of completed trials favours False; every trial's best favours True."""
    off = [trial(False, 0.05, [0.20, 0.36])] + [
        trial(False, 0.06 + i / 200, [0.10 + i / 100], state=TrialState.PRUNED) for i in range(7)]
    on = [trial(True, 0.06 + i / 200, [0.20, 0.22 + i / 100]) for i in range(8)]
    diverged = trial(True, 0.11, [0.05], state=TrialState.PRUNED, diverged=True, device="cpu")
    crashed = trial(True, 0.11, [], state=TrialState.FAIL)  # retried below: counted once, as its retry
    surplus = trial(False, 0.05, [], state=TrialState.FAIL, **{"pcvit:surplus": True})
    retry = trial(True, 0.11, [0.26], failed_trial=17, retry_history=[17])
    return off + on + [diverged, crashed, surplus, retry]


def test_report_counts_pruned_trials_and_gives_a_verdict_only_with_evidence(tmp_path, capsys):
    url, _ = make_study(tmp_path, pruning_biased_trials())
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "18 of 20 trials: complete 10, pruned 8; diverged 1 (6%)." in out
    assert "Best: trial 0, best_probe_accuracy = 0.36" in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith(("| False", "| True"))}
    # trials, completed, pruned (not diverged), diverged, failed, measured, median [q1, q3], best
    assert rows["False"][:6] == ["8", "1", "7", "0", "0", "8"]
    assert rows["True"][:6] == ["10", "9", "0", "1", "0", "10"]  # the retry counts, its crashed original not
    assert rows["False"][6].startswith("0.135 [") and rows["True"][6].startswith("0.255 [")
    assert ("Verdict: True is best, median 0.255 over 10 trials, against the other values' 8 "
            "(rank-sum p = 0.041)") in out
    assert ("No verdict: [0.085, 0.11] has the best median (0.26) but the difference is within the "
            "spread") in out
    assert "linear probe accuracy > 35% (primary): **met** (1 of 18 trials; best 0.36)" in out
    assert "reconstruction (train) MSE < 0.005 (tertiary): **met** (1 of 18 trials; best 0.004)" in out
    assert "diverged trials < 20% (secondary): **met** (1 of 18 trials diverged (6%))" in out
    assert "best_probe_accuracy against the 6-block best (0.3): **met**" in out
    assert "9.00 h of trial wall time over 18 finished trials, 8.50 GPU-hours" in out
    assert "projected to the budget of 20 trials: 10.00 h, 9.4 GPU-hours (30.0 min per trial)" in out
    assert "Spearman rank correlation with the measure: +0.16 (n = 18, p = 0.53)" in out


def test_report_without_enough_trials_says_why_there_is_no_verdict(tmp_path, capsys):
    url, _ = make_study(tmp_path, [trial(False, 0.05, [0.2]), trial(True, 0.06, [0.3]), trial(True, 0.07, [0.31])])
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "No verdict: too few trials (needs 5 measured per value for two values or more; measured False: 1, " \
           "True: 2)" in out
    assert "Spearman rank correlation with the measure: +1.00 (n = 3, a p-value needs 10 trials or more)" in out


def test_json_format_is_the_same_report_for_programs(tmp_path, capsys):
    url, _ = make_study(tmp_path, pruning_biased_trials())
    assert cli.main(["report", "--storage", url, "--study-name", "tiny", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (question,) = data["questions"]
    (layernorm,) = question["parameters"]
    assert layernorm["verdict"]["best"] == "True" and layernorm["verdict"]["p"] < 0.05
    assert {t["target"]: t["met"] for t in data["success"]} == {
        "probe_accuracy": True, "reconstruction_mse": True, "divergence": True, "baseline": True}
    assert data["compute"]["gpu_hours"] == pytest.approx(8.5)


def test_report_and_reap_never_create_a_database(tmp_path, capsys):
    for command in ("report", "reap"):
        assert cli.main([command, "--storage", f"sqlite:///{tmp_path}/typo.db", "--study-name", "tiny"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no such storage file" in err and "typo.db" in err
        assert cli.main([command, "--storage", f"{tmp_path}/typo.log", "--study-name", "tiny"]) == 2
        assert "typo.log" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_report_into_a_closed_pipe_ends_quietly(tmp_path):
    url, _ = make_study(tmp_path, pruning_biased_trials())
    shell = f"{STUDY_CLI} report --storage {url} --study-name tiny | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True,
                          env=worker_env(), timeout=120)
    assert done.stdout == "## Study tiny: maximize best_probe_accuracy\n"
    assert done.stderr == "" and done.returncode == 0


def test_report_of_a_missing_study_is_a_clear_error(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(storage=storage.open_storage(url), study_name="other")
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 2
    assert "study 'tiny'" in capsys.readouterr().err
    assert cli.main(["reap", "--storage", url, "--study-name", "other"]) == 2
    assert "no stored study file" in capsys.readouterr().err


@pytest.mark.parametrize(("pairs", "rho"), [
    ([(1, 1), (2, 2), (3, 3)], 1.0), ([(1, 3), (2, 2), (3, 1)], -1.0), ([(1, 1), (2, 1), (3, 1)], None),
    ([(1, 2), (2, 2), (3, 4), (4, 4)], 0.8944),
])
def test_spearman(pairs, rho):
    assert spearman(pairs) == (pytest.approx(rho, abs=1e-4) if rho is not None else None)


def test_rank_sum_and_quartiles():
    assert rank_sum_p([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(0.0090, abs=5e-4)  # exact: 0.0079
    assert rank_sum_p([1, 3, 5, 7, 9], [2, 4, 6, 8, 10]) > 0.5
    assert quartiles([1, 2, 3, 4, 5]) == (2, 3, 4)


def test_report_to_dashboard_writes_the_study_note(tmp_path, capsys):
    from optuna_dashboard import get_note

    url, study = make_study(tmp_path, pruning_biased_trials())
    assert cli.main(["report", "--storage", url, "--study-name", "tiny", "--to-dashboard"]) == 0
    printed = capsys.readouterr().out
    note = get_note(optuna.load_study(study_name="tiny", storage=storage.open_storage(url)))
    assert printed.rstrip() in note and note.index("## Study tiny") < note.index("## The study file")
    assert "questions:\n- question: Does layer norm help?" in note  # the file as written, whole


def test_the_best_trial_is_shown_beside_its_controls(tmp_path, capsys):
    best = trial(True, 0.06, [0.2, 0.64])
    best.user_attrs.update({"untrained_baseline": 0.44, "pca_baseline": 0.79, "raw_patch_baseline": 0.35,
                            "pca_components": 16})
    url, _ = make_study(tmp_path, [trial(False, 0.05, [0.3]), best])
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 0
    out = capsys.readouterr().out
    assert ("Its controls, the same probe on the same images: the same network untrained 0.44, PCA-16 of the "
            "pixels 0.79, raw patches 0.35.") in out
    assert "affine map of the pixels" not in out  # not measured: not claimed
    (tmp_path / "linear").mkdir()
    measured = trial(True, 0.06, [0.2, 0.64], **{"pcvit:feature_linearity_r2": 0.9994,
                                                 "pcvit:untrained_linearity_r2": 0.9911})
    measured.user_attrs.update(best.user_attrs)
    url, _ = make_study(tmp_path / "linear", [measured])
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 0
    assert ("Its probed features are an affine map of the pixels to R^2 0.9994 (untrained 0.9911); near 1 the "
            "network computes nothing a linear map of the image does not.") in capsys.readouterr().out
    (tmp_path / "none").mkdir()
    url, _ = make_study(tmp_path / "none", [trial(False, 0.05, [0.3])])  # a study without controls says nothing
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 0
    assert "Its controls" not in capsys.readouterr().out


@pytest.mark.parametrize("trials, words", [
    ([], ["0 of 20 trials", "no trial measured yet"]),
    ([trial(False, 0.05, [0.2])], ["1 of 20 trials: complete 1", "(0 of 1 trial; best 0.2)",
                                   "(0 of 1 trial diverged (0%))"]),
    ([trial(False, 0.05, [0.4]), trial(True, 0.06, [0.5], state=TrialState.PRUNED, diverged=True)],
     ["(2 of 2 trials; best 0.5)", "**not met** (1 of 2 trials diverged (50%))"]),
])
def test_report_sentences_read_right_for_none_one_and_several_trials(trials, words, tmp_path, capsys):
    url, _ = make_study(tmp_path, trials)
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 0
    out = capsys.readouterr().out
    for w in words:
        assert w in out, (w, out)


def test_the_documents_cifar10_targets_are_not_judged_on_other_images(tmp_path, capsys):
    url, _ = make_study(tmp_path, [trial(False, 0.05, [0.64])], dataset="fashion-mnist")
    assert cli.main(["report", "--storage", url, "--study-name", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "targets are for CIFAR-10; this study trains on fashion-mnist, so they are not judged here" in out
    assert "linear probe accuracy > 35%" not in out and "diverged trials < 20%" in out
