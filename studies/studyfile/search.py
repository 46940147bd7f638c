"""The suggestions that turn a trial into a config (from the study file's `space`)."""

from __future__ import annotations

from typing import Any

import optuna

from studies.studyfile.spec import StudySpec


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
