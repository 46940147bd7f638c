"""Answer a study's questions from its own trials: per-parameter effect on the metric, divergence per value.

Each trial counted once: a crashed trial that was retried is represented by its retry, and surplus trials
(created beyond the budget by concurrent workers, never trained) are left out. For every parameter the
report groups trials by value (categorical, or at most five distinct values) or by range (thirds of the
sampled values; zero apart for zero_or_log) and gives per group: trials, completed, pruned, failed,
diverged (rate), the mean metric of the completed trials and the best metric of any trial. Numeric
parameters also get Spearman's rank correlation with the metric. The file's `questions` come first.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from studies.retries import is_retry
from studies.spec import StudySpec
from studies.worker import SURPLUS

SUCCESS = {"best_probe_accuracy": (0.35, "probe accuracy > 35% (the document's primary target)"),
           "best_train_mse": (0.005, "reconstruction MSE < 0.005 (the document's tertiary target)")}


def outcome_trials(study: optuna.Study) -> list[FrozenTrial]:
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials if is_retry(t) for n in t.system_attrs["retry_history"]}
    return [t for t in trials if t.number not in retried and not t.system_attrs.get(SURPLUS)]


def metric_of(trial: FrozenTrial, metric: str) -> float | None:
    value = trial.value if trial.state == TrialState.COMPLETE else trial.user_attrs.get(metric)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def study_report(study: optuna.Study, spec: StudySpec) -> str:
    trials = outcome_trials(study)
    metric, maximize = spec.metric, spec.direction == "maximize"
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    diverged = sum(bool(t.user_attrs.get("diverged")) for t in trials)
    lines = [f"Study {study.study_name}: {spec.direction} {metric}; {len(trials)} of {spec.n_trials} trials",
             "  " + ", ".join(f"{n.lower()} {c}" for n, c in states.items() if c),
             f"  diverged {diverged} ({_pct(diverged, len(trials))})"]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if done:
        best = (max if maximize else min)(done, key=lambda t: t.value)
        lines.append(f"  best: trial {best.number}, {metric} = {best.value:.4g}")
        lines += [f"    {k} = {_fmt(v)}" for k, v in best.params.items()]
    if metric in SUCCESS:
        threshold, text = SUCCESS[metric]
        hits = sum((v := metric_of(t, metric)) is not None and (v > threshold if maximize else v < threshold)
                   for t in trials)
        lines.append(f"  {text}: {hits} trials")
    asked = []
    for i, q in enumerate(spec.questions, 1):
        lines += ["", f"Q{i}. {q['question']}"]
        for name in q["params"]:
            lines += parameter_table(trials, name, spec.space[name], metric, maximize)
            asked.append(name)
    rest = [n for n in spec.space if n not in asked]
    if rest:
        lines += ["", "Other parameters"]
        for name in rest:
            lines += parameter_table(trials, name, spec.space[name], metric, maximize)
    return "\n".join(lines)


def parameter_table(trials: list[FrozenTrial], name: str, param: dict, metric: str, maximize: bool) -> list[str]:
    groups = group_trials(trials, name, param)
    lines = [f"  {name}", f"    {'value':>22} {'trials':>6} {'done':>5} {'pruned':>6} {'failed':>6} "
                          f"{'diverged':>9} {'mean':>8} {'best':>8}"]
    means = {}
    for label, members in groups:
        done = [metric_of(t, metric) for t in members if t.state == TrialState.COMPLETE]
        done = [v for v in done if v is not None]
        every = [v for v in (metric_of(t, metric) for t in members) if v is not None]
        diverged = sum(bool(t.user_attrs.get("diverged")) for t in members)
        mean = sum(done) / len(done) if done else None
        means[label] = mean
        best = (max if maximize else min)(every) if every else None
        lines.append(f"    {label:>22} {len(members):>6} {len(done):>5} "
                     f"{sum(t.state == TrialState.PRUNED for t in members):>6} "
                     f"{sum(t.state == TrialState.FAIL for t in members):>6} {_pct(diverged, len(members)):>9} "
                     f"{_fmt(mean):>8} {_fmt(best):>8}")
    known = {k: v for k, v in means.items() if v is not None}
    if len(known) > 1:
        top = (max if maximize else min)(known, key=known.get)
        lines.append(f"    best mean {metric}: {top}")
    if param["type"] != "categorical":
        pairs = [(value_of(t, name, param), metric_of(t, metric)) for t in trials if t.state == TrialState.COMPLETE]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        rho = spearman(pairs)
        if rho is not None:
            lines.append(f"    Spearman rank correlation with {metric}: {rho:+.2f} (n = {len(pairs)})")
    return lines


def value_of(trial: FrozenTrial, name: str, param: dict) -> Any:
    if param["type"] == "zero_or_log" and trial.params.get(f"{name}_is_zero"):
        return 0.0
    return trial.params.get(name)


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


def spearman(pairs: list[tuple[float, float]]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs or no spread."""
    if len(pairs) < 3:
        return None
    xs, ys = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sx, sy = math.sqrt(sum((x - mx) ** 2 for x in xs)), math.sqrt(sum((y - my) ** 2 for y in ys))
    return cov / (sx * sy) if sx and sy else None


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
