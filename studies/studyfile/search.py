"""How a study searches: its sampler and pruner (from the file's `sampler` and `pruner`), and the suggestions
that turn a trial into a config (from its `space`).

The sampler's seed is per worker (from os.urandom), never from the file: workers that share a seed
draw the same trials. A grid is the exception: its order must be the same in every worker, so its seed
is stored with the study (`studies.running.worker.shared_grid_seed`). Each trial records the seed that
sampled it as the `sampler_seed` user attribute.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import optuna

from studies.studyfile.spec import StudyFileError, StudySpec, load_spec


def load_study_file(path: str | os.PathLike) -> StudySpec:
    """A study file as every command reads it, before any storage is touched: the schema and every config a trial
    could get (`studies.studyfile.spec`), then the sampler and pruner Optuna would build from it."""
    spec = load_spec(path)
    check_sampler_and_pruner(spec)
    return spec


def new_sampler_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def build_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    options = {k: v for k, v in spec.sampler.items() if k != "type"}
    kind = spec.sampler["type"]
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind in ("tpe", "gp"):
        with warnings.catch_warnings():  # GPSampler and multivariate TPE are "experimental"; chosen knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if kind == "tpe":
                return optuna.samplers.TPESampler(seed=seed, **options)
            return optuna.samplers.GPSampler(seed=seed, **options)
    grid = {name: p["choices"] for name, p in spec.space.items()}  # validation made them all categorical
    return optuna.samplers.GridSampler(grid, seed=seed)


def model_based_sampler(space: dict[str, dict]) -> tuple[dict[str, Any], str]:
    """The model-based sampler for `space` and why: Optuna's GP sampler (W&B's `bayes` is Gaussian-process
    optimisation), unless the space has parts a GP models badly, then TPE.

    A GP regresses the metric on the parameters as numbers. A parameter that exists only in some trials (the
    value of a zero_or_log, absent when its flag says 0) is outside the space it fits: it would be drawn at
    random. Categorical choices become unordered one-hot dimensions; when they are most of the space the GP
    has little to regress on, while TPE models each choice's frequency among the good trials directly.
    """
    conditional = [name for name, p in space.items() if p["type"] == "zero_or_log"]
    categorical = [name for name, p in space.items() if p["type"] == "categorical"]
    numeric = len(space) - len(conditional) - len(categorical)
    if conditional:
        return {"type": "tpe"}, (f"TPE, not GP: {', '.join(conditional)} exist only in some trials (0 or "
                                 "log-uniform), which Optuna's GP sampler cannot model")
    if len(categorical) > numeric:
        return {"type": "tpe"}, (f"TPE, not GP: {len(categorical)} of the {len(space)} sampled parameters are "
                                 f"categorical ({', '.join(categorical)}), which a GP sees only as unordered "
                                 "one-hot dimensions")
    also = f" and {len(categorical)} categorical" if categorical else ""
    return {"type": "gp"}, (f"GP (W&B's bayes is Gaussian-process optimisation): the space is {numeric} numeric "
                            f"range(s){also}, which a GP models well")


def check_sampler_and_pruner(spec: StudySpec) -> None:
    """Build both once, so that arguments Optuna rejects (percentile 150, ...) fail as study-file errors."""
    for key, build in (("sampler", lambda: build_sampler(spec, 0)), ("pruner", lambda: build_pruner(spec))):
        try:
            build()
        except (ValueError, TypeError) as exc:
            raise StudyFileError(f"{spec.source}: {key}: {exc}") from None


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The file's pruner; `patience`/`min_delta` wrap it in PatientPruner (prune only after a plateau)."""
    options = {k: v for k, v in spec.pruner.items() if k not in ("type", "patience", "min_delta")}
    kind = spec.pruner["type"]
    pruner: optuna.pruners.BasePruner
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        pruner = optuna.pruners.MedianPruner(**options)
    elif kind == "percentile":
        pruner = optuna.pruners.PercentilePruner(**options)
    elif kind == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(**options)
    else:
        pruner = optuna.pruners.HyperbandPruner(**options)
    if "patience" in spec.pruner:
        with warnings.catch_warnings():  # "experimental" since Optuna 2.8; chosen knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            pruner = optuna.pruners.PatientPruner(pruner, patience=spec.pruner["patience"],
                                                  min_delta=spec.pruner.get("min_delta", 0.0))
    return pruner


def suggest_config(trial: optuna.Trial | optuna.trial.FixedTrial, spec: StudySpec) -> dict[str, Any]:
    """The config values of one trial: fixed settings plus one suggestion per `space` parameter."""
    values = {}
    for name, p in spec.space.items():
        if p["type"] == "categorical":
            values[name] = trial.suggest_categorical(name, p["choices"])
        elif p["type"] == "zero_or_log":  # 0 has probability 1/2; otherwise log-uniform in [low, high]
            zero = trial.suggest_categorical(f"{name}_is_zero", [True, False])
            values[name] = 0.0 if zero else trial.suggest_float(name, p["low"], p["high"], log=True)
        elif p["type"] == "int":
            values[name] = trial.suggest_int(name, p["low"], p["high"], step=p.get("step", 1), log=p.get("log", False))
        else:
            values[name] = trial.suggest_float(name, p["low"], p["high"], step=p.get("step"), log=p.get("log", False))
    return spec.config_dict(values)


def representative_params(spec: StudySpec) -> dict[str, Any]:
    """Params of a representative trial (each parameter at its low end) for the start-up data check."""
    params: dict[str, Any] = {}
    for name, p in spec.space.items():
        if p["type"] == "categorical":
            params[name] = p["choices"][0]
        elif p["type"] == "zero_or_log":
            params[f"{name}_is_zero"] = True
        else:
            params[name] = p["low"]
    return params
