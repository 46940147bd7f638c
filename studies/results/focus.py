"""The follow-up study the document plans ("a smaller focused sweep based on initial results"), written from a
finished or running study.

    pcvit-study focus --storage URL --study-name NAME --n-trials 100 -o studies/NAME-focus.yaml [--into NAME-focus]

From the study's best trials (the top quarter of those with a value, at least three):
* a numeric range shrinks to the span of the best trials' values, widened by a tenth of that span on each side
  (in log space for a log range), never beyond the original range;
* a categorical parameter keeps the choices that appear among the best trials (one left: it is fixed);
* a 0-or-log parameter becomes 0 when every best trial has 0, a log range when none has, else stays 0-or-log;
* a parameter whose importance (Optuna's PED-ANOVA over the finished trials) is below 5% is fixed at the best
  trial's value: the follow-up spends its budget where it matters;
* the sampler is model-based (`samplers.model_based_sampler`: GP, or TPE for categorical or conditional spaces);
* the budget is the one given; `focused_from` records the first study and its best trials, which the report of
  the follow-up names.
With `--into NEW`, the new study is created in the same storage with the file stored, and the best trials'
parameters are enqueued, so the follow-up starts from them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from studies.studyfile.samplers import model_based_sampler
from studies.studyfile.spec import StudyFileError, StudySpec, param_value, spec_from_document

MIN_FINISHED = 8  # finished trials with a value before a focus means anything
TOP_FRACTION = 0.25
WIDEN = 0.1  # of the best trials' span, on each side
UNIMPORTANT = 0.05  # normalised importance below which a parameter is fixed


def best_trials(study: optuna.Study, spec: StudySpec, fraction: float = TOP_FRACTION) -> list[FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None
            and math.isfinite(t.value)]
    if len(done) < MIN_FINISHED:
        raise StudyFileError(f"study {study.study_name!r} has {len(done)} finished trial(s) with a value; a focus "
                             f"needs at least {MIN_FINISHED} to tell the best region from noise")
    done.sort(key=lambda t: t.value, reverse=spec.direction == "maximize")
    return done[:max(3, math.ceil(fraction * len(done)))]


def importances(study: optuna.Study) -> dict[str, float]:
    """Normalised importance of each sampled Optuna param ({} when Optuna cannot compute them)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}
    total = sum(found.values())
    return {k: v / total for k, v in found.items()} if total > 0 else {}


def narrowed(name: str, param: dict, values: list[Any]) -> tuple[str, Any]:
    """("space", new param) or ("fixed", value) for one parameter, from the best trials' values of it."""
    kind = param["type"]
    if kind == "categorical":
        kept = [c for c in param["choices"] if c in values]
        return ("fixed", kept[0]) if len(kept) == 1 else ("space", {**param, "choices": kept})
    if kind == "zero_or_log":
        nonzero = [v for v in values if v]
        if not nonzero:
            return "fixed", 0.0
        low, high = _span([float(v) for v in nonzero], param["low"], param["high"], log=True)
        return "space", ({"type": "float", "low": low, "high": high, "log": True} if len(nonzero) == len(values)
                         else {**param, "low": low, "high": high})
    low, high = _span([float(v) for v in values], param["low"], param["high"], log=param.get("log", False))
    if kind == "int":
        low, high = math.floor(low), math.ceil(high)
        step = param.get("step", 1)
        low = param["low"] + (low - param["low"]) // step * step  # stay on the original grid of steps
    elif "step" in param:
        step = param["step"]
        low = param["low"] + math.floor((low - param["low"]) / step) * step
        high = param["low"] + math.ceil((high - param["low"]) / step) * step
    if low >= high:
        return "fixed", type(param["low"])(values[0]) if kind == "int" else values[0]
    return "space", {**param, "low": low, "high": high}


def _span(values: list[float], lowest: float, highest: float, log: bool) -> tuple[float, float]:
    to, back = (math.log, math.exp) if log else ((lambda v: v), (lambda v: v))
    low, high = to(min(values)), to(max(values))
    margin = WIDEN * (high - low)
    return max(lowest, back(low - margin)), min(highest, back(high + margin))


def focus_document(study: optuna.Study, spec: StudySpec, n_trials: int, name: str) -> tuple[dict, list[FrozenTrial]]:
    """The narrowed study file (a document, validated) and the best trials it was drawn from."""
    best = best_trials(study, spec)
    weights = importances(study)
    fixed, space, notes = dict(spec.fixed), {}, []
    for pname, param in spec.space.items():
        values = [param_value(t.params, pname, param) for t in best]
        weight = weights.get(pname, weights.get(f"{pname}_is_zero"))
        if weight is not None and weight < UNIMPORTANT:
            fixed[pname] = values[0]
            notes.append(f"{pname} fixed at the best trial's {values[0]!r} (importance {weight:.0%})")
            continue
        where, value = narrowed(pname, param, values)
        (fixed if where == "fixed" else space)[pname] = value
    if not space:
        raise StudyFileError(f"study {study.study_name!r}: every parameter would be fixed; nothing left to search")
    sampler, why = model_based_sampler(space)
    numbers = [t.number for t in best]
    document = {
        "name": name,
        "description": f"focused from study {study.study_name!r} around its best trials {numbers}: "
                       + "; ".join(notes + [f"sampler {why}"]),
        "direction": spec.direction, "metric": spec.metric, "sampler": sampler, "pruner": spec.pruner,
        "n_trials": n_trials, "max_retries": spec.max_retries,
        "checkpoint_every_n_epochs": spec.checkpoint_every_n_epochs,
        "heartbeat_interval": spec.heartbeat_interval, "grace_period": spec.grace_period,
        "fixed": fixed, "space": space,
        "focused_from": {"study": study.study_name, "trials": numbers},
    }
    spec_from_document(document, f"the focus of study {study.study_name!r}")  # every check of a study file
    return document, best


def enqueue_best(study: optuna.Study, spec: StudySpec, best: list[FrozenTrial]) -> int:
    """Enqueue the best trials' params that `spec` still samples (each in its new range), each distinct set once;
    returns how many were enqueued (two best trials may differ only in a parameter now fixed)."""
    seen = []
    for trial in best:
        params = {}
        for pname, param in spec.space.items():
            value = param_value(trial.params, pname, param)
            if param["type"] == "zero_or_log":
                params[f"{pname}_is_zero"] = not value
                if value:
                    params[pname] = value
            else:
                params[pname] = value
        if params not in seen:
            seen.append(params)
            study.enqueue_trial(params)
    return len(seen)


def dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, width=110)
