"""Answer a study's questions from its own trials, without the bias pruning puts on completed-only means.

With a median pruner, the worse a value does the more of its trials are pruned; a mean over COMPLETED trials
then keeps only its lucky ones. So each trial is measured by the best value it reported (its best probe for
`best_probe_accuracy`), pruned and diverged trials included, and groups are compared by median and quartiles,
with the number of trials behind each. A verdict is given only where the evidence carries one: at least
MIN_PER_GROUP measured trials on each side and a rank-sum test (Mann-Whitney) at p < ALPHA; otherwise the
report says why not.

Each trial counted once: a crashed trial that was retried is represented by its retry, and surplus trials
(created beyond the budget by concurrent workers, never trained) are left out. `study_summary` returns plain
data (the JSON format); `render_markdown` writes it for people (the terminal and the dashboard's note).
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pcvit.config import Config
from studies.results.report_stats import quartiles, rank_sum_p, spearman, spearman_p
from studies.running.records import record
from studies.running.retries import is_retry
from studies.studyfile.spec import StudySpec, param_value
from studies.running.worker import SURPLUS

MIN_PER_GROUP = 5
ALPHA = 0.05
MIN_FOR_P = 10  # Spearman's p from the t approximation means little below this
# The document's success targets: (key, trial attribute, threshold, below?, text)
TARGETS = (  # the user's document's targets, written for CIFAR-10: judged only for studies of CIFAR-10 images
    ("probe_accuracy", "best_probe_accuracy", 0.35, False, "linear probe accuracy > 35% (primary)"),
    ("reconstruction_mse", "best_train_mse", 0.005, True, "reconstruction (train) MSE < 0.005 (tertiary)"),
)
TARGETS_DATASET = "cifar10"
MAX_DIVERGED = 0.20  # secondary target: fewer diverged runs, read as below 20% of trials


def outcome_trials(study: optuna.Study) -> list[FrozenTrial]:
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials if is_retry(t) for n in t.system_attrs["retry_history"]}
    return [t for t in trials if t.number not in retried and not t.system_attrs.get(SURPLUS)]


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def trial_measure(trial: FrozenTrial, metric: str, maximize: bool) -> float | None:
    """The best value the trial reached: its best reported value, else its recorded metric (any state)."""
    reported = [v for v in map(_number, trial.intermediate_values.values()) if v is not None]
    if metric.startswith("best_") and reported:
        return (max if maximize else min)(reported)
    value = trial.value if trial.state == TrialState.COMPLETE else record(trial).get(metric)
    value = _number(value)
    if value is None and reported:
        return reported[-1]
    return value


def value_of(trial: FrozenTrial, name: str, param: dict) -> Any:
    return param_value(trial.params, name, param)


def group_trials(trials: list[FrozenTrial], name: str, param: dict) -> list[tuple[str, list[FrozenTrial]]]:
    with_value = [(value_of(t, name, param), t) for t in trials]
    with_value = [(v, t) for v, t in with_value if v is not None]
    if param["type"] == "categorical":
        return [(_fmt(c), [t for v, t in with_value if v == c]) for c in param["choices"]]
    groups = []
    if param["type"] == "zero_or_log":
        groups.append(("0", [t for v, t in with_value if v == 0.0]))
        with_value = [(v, t) for v, t in with_value if v != 0.0]
    values = sorted({v for v, _ in with_value})
    if len(values) <= 5:  # few distinct values (an int grid, a young study): one group each
        return groups + [(_fmt(x), [t for v, t in with_value if v == x]) for x in values]
    cuts = [values[0], values[len(values) // 3], values[2 * len(values) // 3], values[-1]]
    for i in range(3):
        low, high, last = cuts[i], cuts[i + 1], i == 2
        members = [t for v, t in with_value if low <= v and (v < high or (last and v == high))]
        groups.append((f"[{_fmt(low)}, {_fmt(high)}{']' if last else ')'}", members))
    return groups


def group_summary(label: str, members: list[FrozenTrial], metric: str, maximize: bool) -> dict[str, Any]:
    measures = [m for m in (trial_measure(t, metric, maximize) for t in members) if m is not None]
    row: dict[str, Any] = {
        "value": label, "trials": len(members),
        "completed": sum(t.state == TrialState.COMPLETE for t in members),
        "pruned": sum(t.state == TrialState.PRUNED and not record(t).get("diverged") for t in members),
        "diverged": sum(bool(record(t).get("diverged")) for t in members),
        "failed": sum(t.state == TrialState.FAIL for t in members),
        "measured": len(measures), "median": None, "q1": None, "q3": None, "best": None,
    }
    if measures:
        row["q1"], row["median"], row["q3"] = quartiles(measures)
        row["best"] = (max if maximize else min)(measures)
    row["_measures"] = measures
    return row


def parameter_summary(trials: list[FrozenTrial], name: str, param: dict, metric: str, maximize: bool) -> dict:
    rows = [group_summary(label, members, metric, maximize) for label, members in group_trials(trials, name, param)]
    result: dict[str, Any] = {"parameter": name, "groups": rows, "verdict": verdict(rows, maximize)}
    if param["type"] != "categorical":
        pairs = [(value_of(t, name, param), trial_measure(t, metric, maximize)) for t in trials]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        rho = spearman(pairs)
        p = spearman_p(rho, len(pairs)) if rho is not None and len(pairs) >= MIN_FOR_P else None
        result["spearman"] = None if rho is None else {"rho": rho, "n": len(pairs), "p": p}
    for row in rows:
        row.pop("_measures")
    return result


def verdict(rows: list[dict], maximize: bool) -> dict[str, Any]:
    """Which value is best, if the trials say so: the top group by median against all other measured trials."""
    enough = [r for r in rows if r["measured"] >= MIN_PER_GROUP]
    if len(enough) < 2:
        counts = ", ".join(f"{r['value']}: {r['measured']}" for r in rows)
        return {"best": None, "p": None,
                "text": f"too few trials (needs {MIN_PER_GROUP} measured per value for two values "
                        f"or more; measured {counts})"}
    top = (max if maximize else min)(enough, key=lambda r: r["median"])
    others = [m for r in rows if r is not top for m in r["_measures"]]
    p = rank_sum_p(top["_measures"], others)
    if p < ALPHA:
        return {"best": top["value"], "p": p,
                "text": f"{top['value']} is best, median {_fmt(top['median'])} over {top['measured']} trials, "
                        f"against the other values' {len(others)} (rank-sum p = {p:.2g})"}
    return {"best": None, "p": p,
            "text": f"{top['value']} has the best median ({_fmt(top['median'])}) but the difference "
                    f"is within the spread (rank-sum p = {p:.2g}, {top['measured']} against {len(others)} trials)"}


def compute_summary(trials: list[FrozenTrial], n_trials: int) -> dict[str, Any]:
    """Wall time spent (sum over trials), GPU-hours (trials on a CUDA device), and the projection to the budget."""
    def seconds(t: FrozenTrial) -> float:
        recorded = _number(record(t).get("wall_time_s"))
        if recorded is not None:
            return recorded
        if t.datetime_start and t.datetime_complete:
            return (t.datetime_complete - t.datetime_start).total_seconds()
        return 0.0

    finished = [t for t in trials if t.state.is_finished()]
    spent = sum(seconds(t) for t in finished)
    gpu = sum(seconds(t) for t in finished if str(record(t).get("device", "")).startswith("cuda"))
    per_trial = spent / len(finished) if finished else None
    remaining = max(0, n_trials - len(finished))
    projected = spent + per_trial * remaining if per_trial is not None else None
    gpu_share = gpu / spent if spent else 0.0
    return {"finished_trials": len(finished), "wall_hours": spent / 3600, "gpu_hours": gpu / 3600,
            "hours_per_trial": per_trial / 3600 if per_trial is not None else None,
            "projected_wall_hours": projected / 3600 if projected is not None else None,
            "projected_gpu_hours": projected * gpu_share / 3600 if projected is not None else None,
            "budget": n_trials}


def success_summary(trials: list[FrozenTrial], spec: StudySpec) -> list[dict[str, Any]]:
    lines = []
    dataset = spec.fixed.get("dataset", Config.dataset)
    for key, attr, threshold, below, text in TARGETS if dataset == TARGETS_DATASET else ():
        values = [v for v in (_number(record(t).get(attr)) for t in trials) if v is not None]
        hits = [v for v in values if (v < threshold if below else v > threshold)]
        best = (min if below else max)(values) if values else None
        lines.append({"target": key, "text": text, "met": bool(hits), "trials_meeting": len(hits),
                      "trials_measured": len(values), "best": best})
    diverged = sum(bool(record(t).get("diverged")) for t in trials)
    rate = diverged / len(trials) if trials else None
    lines.append({"target": "divergence", "text": "diverged trials < 20% (secondary)",
                  "met": rate is not None and rate < MAX_DIVERGED, "trials_meeting": len(trials) - diverged,
                  "trials_measured": len(trials), "best": rate})
    baseline = spec.baseline
    if baseline:
        maximize = spec.direction == "maximize"
        values = [v for v in (_number(record(t).get(spec.metric)) for t in trials) if v is not None]
        best = (max if maximize else min)(values) if values else None
        beats = best is not None and (best > baseline["value"] if maximize else best < baseline["value"])
        lines.append({"target": "baseline", "text": f"{spec.metric} against {baseline['label']} "
                                                    f"({_fmt(baseline['value'])})",
                      "met": beats, "trials_meeting": sum((v > baseline["value"]) == maximize for v in values),
                      "trials_measured": len(values), "best": best})
    return lines


CONTROL_ATTRS = {"untrained_baseline": "the same network untrained", "pca_baseline": "PCA-{k} of the pixels",
                 "raw_patch_baseline": "raw patches", "pixel_baseline": "all the pixels"}


LINEARITY_ATTRS = ("feature_linearity_r2", "untrained_linearity_r2")


def controls_of(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's probed controls (`pcvit.controls`) as {attribute: accuracy}, plus `pca_components` and how
    affine in the pixels its features and the untrained network's are (R^2), when measured."""
    kept = record(trial)
    found = {key: kept[key] for key in CONTROL_ATTRS if key in kept}
    if found:
        found.update({key: kept[key] for key in ("pca_components", *LINEARITY_ATTRS) if key in kept})
    return found


def study_summary(study: optuna.Study, spec: StudySpec) -> dict[str, Any]:
    """Everything the report says, as plain data (what `--format json` prints)."""
    trials = outcome_trials(study)
    metric, maximize = spec.metric, spec.direction == "maximize"
    done = [t for t in trials if t.state == TrialState.COMPLETE and _number(t.value) is not None]
    best = (max if maximize else min)(done, key=lambda t: t.value) if done else None
    asked: list[str] = []
    questions = []
    for q in spec.questions:
        questions.append({"question": q["question"], "parameters": [
            parameter_summary(trials, name, spec.space[name], metric, maximize) for name in q["params"]]})
        asked += q["params"]
    return {
        "study": study.study_name, "direction": spec.direction, "metric": metric,
        "measure": f"each trial's best reported {metric} (pruned and diverged trials included)",
        "budget": spec.n_trials, "trials": len(trials),
        "states": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState
                   if any(t.state == s for t in trials)},
        "diverged": sum(bool(record(t).get("diverged")) for t in trials),
        "best_trial": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                                 "controls": controls_of(best)},
        "success": success_summary(trials, spec),
        "focused_from": spec.focused_from,
        "targets_skipped": None if spec.fixed.get("dataset", Config.dataset) == TARGETS_DATASET
        else spec.fixed.get("dataset"),
        "compute": compute_summary(trials, spec.n_trials),
        "questions": questions,
        "other_parameters": [parameter_summary(trials, name, spec.space[name], metric, maximize)
                             for name in spec.space if name not in asked],
    }


def render_markdown(s: dict[str, Any]) -> str:
    lines = [f"## Study {s['study']}: {s['direction']} {s['metric']}", "",
             f"{s['trials']} of {s['budget']} trials: "
             + ", ".join(f"{n} {c}" for n, c in s["states"].items())
             + f"; diverged {s['diverged']} ({_pct(s['diverged'], s['trials'])})."]
    if s.get("focused_from"):
        origin = s["focused_from"]
        lines.append(f"Focused from study {origin['study']!r}: its best trials {origin['trials']} drew the ranges "
                     "and were run first.")
    if s.get("targets_skipped"):
        lines.append(f"The document's probe and MSE targets are for CIFAR-10; this study trains on "
                     f"{s['targets_skipped']}, so they are not judged here.")
    if s["best_trial"]:
        b = s["best_trial"]
        lines.append(f"Best: trial {b['number']}, {s['metric']} = {_fmt(b['value'])} ("
                     + ", ".join(f"{k} = {_fmt(v)}" for k, v in b["params"].items()) + ").")
        if b.get("controls"):
            k = b["controls"].get("pca_components", "k")
            shown = [f"{CONTROL_ATTRS[key].format(k=k)} {_fmt(v)}" for key, v in b["controls"].items()
                     if key in CONTROL_ATTRS]
            lines.append(f"Its controls, the same probe on the same images: {', '.join(shown)}.")
            if all(key in b["controls"] for key in LINEARITY_ATTRS):
                lines.append(f"Its probed features are an affine map of the pixels to R^2 "
                             f"{b['controls']['feature_linearity_r2']:.4f} (untrained "
                             f"{b['controls']['untrained_linearity_r2']:.4f}); near 1 the network computes nothing "
                             f"a linear map of the image does not.")
    lines += ["", "### Success targets", ""]
    for t in s["success"]:
        lines.append(f"- {t['text']}: **{'met' if t['met'] else 'not met'}** ({_target_detail(t)})")
    c = s["compute"]
    lines += ["", "### Compute", "",
              f"- spent: {_duration(c['wall_hours'])} of trial wall time over {c['finished_trials']} finished "
              f"trials, {c['gpu_hours']:.2f} GPU-hours"]
    if c["hours_per_trial"] is not None:
        lines.append(f"- projected to the budget of {c['budget']} trials: {_duration(c['projected_wall_hours'])}, "
                     f"{c['projected_gpu_hours']:.1f} GPU-hours ({_duration(c['hours_per_trial'])} per trial)")
    lines += ["", f"Measure: {s['measure']}; median [quartiles] over the measured trials (n)."]
    for i, q in enumerate(s["questions"], 1):
        lines += ["", f"### Q{i}. {q['question']}"]
        for p in q["parameters"]:
            lines += _parameter_lines(p)
    if s["other_parameters"]:
        lines += ["", "### Other parameters"]
        for p in s["other_parameters"]:
            lines += _parameter_lines(p)
    return "\n".join(lines) + "\n"


def _parameter_lines(p: dict[str, Any]) -> list[str]:
    lines = ["", f"**{p['parameter']}**", "",
             "| value | trials | completed | pruned | diverged | failed | n | median [q1, q3] | best |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in p["groups"]:
        spread = f"{_fmt(r['median'])} [{_fmt(r['q1'])}, {_fmt(r['q3'])}]" if r["median"] is not None else "-"
        lines.append(f"| {r['value']} | {r['trials']} | {r['completed']} | {r['pruned']} | {r['diverged']} | "
                     f"{r['failed']} | {r['measured']} | {spread} | {_fmt(r['best'])} |")
    verdict_text = p["verdict"]["text"]
    lines += ["", f"Verdict: {verdict_text}." if p["verdict"]["best"] is not None else f"No verdict: {verdict_text}."]
    rho = p.get("spearman")
    if rho:
        p_text = f"p = {rho['p']:.2g}" if rho["n"] >= MIN_FOR_P else f"a p-value needs {MIN_FOR_P} trials or more"
        lines.append(f"Spearman rank correlation with the measure: {rho['rho']:+.2f} (n = {rho['n']}, {p_text}).")
    return lines


def _target_detail(t: dict[str, Any]) -> str:
    """`1 of 18 trials; best 0.36`, `1 of 18 trials diverged (6%)`, `no trial measured yet`."""
    measured = t["trials_measured"]
    if not measured:
        return "no trial measured yet"
    trials = "trial" if measured == 1 else "trials"
    if t["target"] == "divergence":
        diverged = measured - t["trials_meeting"]
        return f"{diverged} of {measured} {trials} diverged ({_pct_value(t['best'])})"
    return f"{t['trials_meeting']} of {measured} {trials}; best {_fmt(t['best'])}"


def _duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:.2f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _pct_value(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.0f}%"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
