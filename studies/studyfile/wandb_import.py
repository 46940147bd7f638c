"""Turn a W&B sweep definition into a study file, losing nothing silently.

Mapping: `method` random/grid -> sampler random/grid, bayes -> Optuna's GP sampler, or TPE when the space
has parts a GP models badly (`studies.studyfile.samplers.model_based_sampler`; a note says which and why);
`metric` {name, goal} -> metric, direction;
`parameters`: `value` or a one-element `values` -> fixed; `values` -> categorical (the exact values);
`min`/`max` with `distribution` uniform -> float, int_uniform -> int, log_uniform_values -> float log,
q_uniform -> float with step q, log_uniform (bounds are exponents: e^min..e^max) -> float log;
`early_terminate` hyperband -> pruner hyperband; `run_cap` (else `count`, else the grid size) -> n_trials.
Keys of the original sweep that had no effect (`studies.studyfile.spec.NO_EFFECT`) are dropped with a printed note
naming each; launch settings (program, command, project, entity) are ignored with a note; anything else
this cannot express (normal distributions, probabilities, nested parameters, unknown keys) is an error.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Callable

import yaml

from pcvit.config import ConfigError, coerce, field_names
from studies.studyfile.samplers import model_based_sampler
from studies.studyfile.spec import METRICS, NO_EFFECT, StudyFileError, validate

LAUNCH_KEYS = ("program", "command", "project", "entity")
SWEEP_KEYS = ("method", "metric", "parameters", "name", "description", "early_terminate", "run_cap", "count",
              *LAUNCH_KEYS)


def import_sweep(sweep: Any, source: str, n_trials: int | None = None,
                 note: Callable[[str], None] = print) -> dict[str, Any]:
    """The study document for W&B sweep `sweep` (parsed YAML); `note` hears every dropped or defaulted key."""
    def fail(key: str, message: str) -> StudyFileError:
        return StudyFileError(f"{source}: {key}: {message}")

    if not isinstance(sweep, dict):
        raise StudyFileError(f"{source}: a W&B sweep is a mapping with method, metric and parameters")
    for key in sweep:
        if key not in SWEEP_KEYS:
            raise fail(key, f"unknown W&B sweep key (this importer knows {', '.join(SWEEP_KEYS)})")
    for key in LAUNCH_KEYS:
        if key in sweep:
            note(f"ignored {key}: it says how W&B launches runs; pcvit-worker runs the trials")
    method = sweep.get("method")
    if method not in ("random", "grid", "bayes"):
        raise fail("method", f"{method!r} is not a W&B sweep method (random, grid or bayes)")
    metric = sweep.get("metric")
    if not isinstance(metric, dict) or "name" not in metric:
        raise fail("metric", "needs {name: ..., goal: maximize|minimize}")
    if metric["name"] not in METRICS:
        raise fail("metric.name", f"{metric['name']!r} is not a pcvit result (known: {', '.join(METRICS)})")
    if "goal" not in metric:
        note("metric.goal is missing: W&B's default, minimize, is used")
    goal = metric.get("goal", "minimize")
    if goal not in ("maximize", "minimize") or set(metric) - {"name", "goal"}:
        raise fail("metric", f"expected name and goal maximize|minimize, got {metric}")

    fixed, space = {}, {}
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise fail("parameters", "is missing or empty")
    if "count" in parameters:
        note(f"dropped parameters.count: {NO_EFFECT['count']}")
    for name, entry in parameters.items():
        if name == "count":
            continue
        key = f"parameters.{name}"
        if name in NO_EFFECT:
            note(f"dropped {key}: no effect in the original sweep ({NO_EFFECT[name]})")
            continue
        if name not in field_names():
            raise fail(key, "unknown parameter: not a pcvit config field, and not a known no-op of the original")
        kind, value = _convert(name, entry, key, fail, note)
        (fixed if kind == "fixed" else space)[name] = value

    document = {
        "name": sweep.get("name") or pathlib.Path(source).stem,
        "description": sweep.get("description") or f"imported from the W&B sweep {pathlib.Path(source).name}",
        "direction": goal,
        "metric": metric["name"],
        "sampler": _sampler(method, space, note),
        "pruner": _pruner(sweep.get("early_terminate"), fail, note),
        "n_trials": _n_trials(sweep, space, method, n_trials, fail, note),
        "fixed": fixed,
        "space": space,
    }
    validate(document, source)  # the checks of any study file, before anything is written
    return document


def _sampler(method: str, space: dict, note: Callable) -> dict[str, Any]:
    if method != "bayes":
        return {"type": method}
    sampler, why = model_based_sampler(space)
    note(f"method bayes -> sampler {sampler['type']}: {why}")
    return sampler


def _convert(name: str, entry: Any, key: str, fail: Callable, note: Callable) -> tuple[str, Any]:
    if not isinstance(entry, dict):
        raise fail(key, f"expected a mapping such as {{value: ...}} or {{values: [...]}}, got {entry!r}")
    keys, dist = set(entry), entry.get("distribution")
    for bad, why in (("parameters", "nested parameters have no Optuna counterpart (a study samples flat names)"),
                     ("probabilities", "Optuna samples categorical choices with equal weight, not given ones"),
                     ("mu", "Optuna samples uniform, log-uniform, stepped or categorical values, not normal ones"),
                     ("sigma", "Optuna samples uniform, log-uniform, stepped or categorical values, not normal ones")):
        if bad in keys:
            raise fail(f"{key}.{bad}", f"cannot be expressed: {why}")
    if "value" in keys and keys <= {"value", "distribution"} and dist in (None, "constant"):
        return "fixed", _typed(name, entry["value"], key, fail)
    if "values" in keys and keys <= {"values", "distribution"} and dist in (None, "categorical"):
        values = entry["values"]
        if not isinstance(values, list) or not values:
            raise fail(f"{key}.values", "must be a non-empty list")
        if len(values) == 1:
            return "fixed", _typed(name, values[0], key, fail)
        if name != "linear_probe_vode_indices":  # node lists stay text: Optuna choices are scalars
            values = [_typed(name, v, f"{key}.values", fail) for v in values]
        return "space", {"type": "categorical", "choices": values}
    if {"min", "max"} <= keys and keys <= {"min", "max", "distribution", "q"}:
        low, high = entry["min"], entry["max"]
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high))
        dist = dist or ("int_uniform" if ints else "uniform")
        if "q" in keys and dist != "q_uniform":
            raise fail(f"{key}.q", f"only q_uniform takes q, not {dist}")
        if dist == "uniform":
            return "space", {"type": "float", "low": float(low), "high": float(high)}
        if dist == "int_uniform":
            return "space", {"type": "int", "low": int(low), "high": int(high)}
        if dist == "log_uniform_values":
            return "space", {"type": "float", "low": float(low), "high": float(high), "log": True}
        if dist == "q_uniform":
            return "space", {"type": "float", "low": float(low), "high": float(high), "step": entry.get("q", 1.0)}
        if dist == "log_uniform":
            note(f"{key}: log_uniform bounds are exponents; sampling log-uniformly in [e^{low}, e^{high}]")
            return "space", {"type": "float", "low": math.exp(low), "high": math.exp(high), "log": True}
        raise fail(f"{key}.distribution", f"{dist!r} cannot be expressed (Optuna samples uniform, log-uniform, "
                                          "stepped or categorical values)")
    raise fail(key, f"cannot be expressed: {entry!r} (expected value, values, or min/max with a distribution)")


def _typed(name: str, value: Any, key: str, fail: Callable) -> Any:
    """A fixed value in the config's type, as YAML writes it (e.g. linear_probe_vode_indices "0" -> [0])."""
    try:
        value = coerce(name, value)
    except ConfigError as exc:
        raise fail(key, str(exc)) from None
    return list(value) if isinstance(value, tuple) else value


def _pruner(early: Any, fail: Callable, note: Callable) -> dict[str, Any]:
    if early is None:
        note("the sweep has no early_terminate: pruner none (set one in the study file to prune)")
        return {"type": "none"}
    if not isinstance(early, dict) or early.get("type") != "hyperband":
        raise fail("early_terminate", f"only type hyperband can be expressed, got {early!r}")
    names = {"min_iter": "min_resource", "max_iter": "max_resource", "eta": "reduction_factor"}
    for key in early:
        if key not in (*names, "type"):
            raise fail(f"early_terminate.{key}", "cannot be expressed with Optuna's HyperbandPruner")
    return {"type": "hyperband", **{names[k]: v for k, v in early.items() if k in names}}


def _n_trials(sweep: dict, space: dict, method: str, given: int | None, fail: Callable, note: Callable) -> int:
    if given is not None:
        return given
    if "run_cap" in sweep:
        return int(sweep["run_cap"])
    if "count" in sweep:
        note(f"used count: {sweep['count']} as n_trials (W&B itself does not read it; the original's agents "
             "were started with --count)")
        return int(sweep["count"])
    if method == "grid":
        return math.prod(len(p["choices"]) for p in space.values())
    raise fail("run_cap", "the sweep sets no run_cap or count: give the trial budget with --n-trials")


def import_file(path: str | pathlib.Path, n_trials: int | None = None,
                note: Callable[[str], None] = print) -> str:
    """The study file text for the W&B sweep file at `path`."""
    path = pathlib.Path(path)
    try:
        sweep = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise StudyFileError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise StudyFileError(f"{path}: not valid YAML: {exc}") from None
    document = import_sweep(sweep, str(path), n_trials, note)
    header = f"# Imported from the W&B sweep {path.name} by `pcvit-study import-wandb`.\n"
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=110)
