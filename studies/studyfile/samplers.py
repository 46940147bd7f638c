"""Optuna's sampler and pruner for a study file's `sampler` and `pruner` sections.

The sampler's seed is per worker (from os.urandom), never from the file: workers that share a seed draw the
same trials. Each trial records its worker's seed as the `sampler_seed` user attribute. The grid is the
exception: its order must be the same in every worker (grid ids are shared through the storage, and
Optuna's GridSampler shuffles the grid with its seed), so the grid is shuffled with one seed for all and
only the choice among the points not yet run is each worker's own.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import optuna

GRID_ORDER_SEED = 0  # every worker's grid order; a study-wide constant, not a choice


def new_sampler_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def build_sampler(sampler: Mapping[str, Any], space: Mapping[str, dict], seed: int) -> optuna.samplers.BaseSampler:
    """The sampler a file's `sampler` section names, seeded with this worker's `seed`."""
    options = {k: v for k, v in sampler.items() if k != "type"}
    kind = sampler["type"]
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind in ("tpe", "gp"):
        with warnings.catch_warnings():  # GPSampler and multivariate TPE are "experimental"; chosen knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if kind == "tpe":
                return optuna.samplers.TPESampler(seed=seed, **options)
            return optuna.samplers.GPSampler(seed=seed, **options)
    grid = optuna.samplers.GridSampler({name: p["choices"] for name, p in space.items()}, seed=GRID_ORDER_SEED)
    grid.reseed_rng()  # the same order everywhere, this worker's own choice among the points not yet run
    return grid


def build_pruner(pruner: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """The file's pruner; `patience`/`min_delta` wrap it in PatientPruner (prune only after a plateau)."""
    options = {k: v for k, v in pruner.items() if k not in ("type", "patience", "min_delta")}
    kind = pruner["type"]
    built: optuna.pruners.BasePruner
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        built = optuna.pruners.MedianPruner(**options)
    elif kind == "percentile":
        built = optuna.pruners.PercentilePruner(**options)
    elif kind == "successive_halving":
        built = optuna.pruners.SuccessiveHalvingPruner(**options)
    else:
        built = optuna.pruners.HyperbandPruner(**options)
    if "patience" in pruner:
        with warnings.catch_warnings():  # "experimental" since Optuna 2.8; chosen knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            built = optuna.pruners.PatientPruner(built, patience=pruner["patience"],
                                                 min_delta=pruner.get("min_delta", 0.0))
    return built


def build_problems(sampler: Mapping[str, Any], pruner: Mapping[str, Any], space: Mapping[str, dict]) -> dict[str, str]:
    """Build both once: {section: Optuna's complaint} for arguments it rejects (percentile 150, ...)."""
    problems = {}
    for key, build in (("sampler", lambda: build_sampler(sampler, space, 0)), ("pruner", lambda: build_pruner(pruner))):
        try:
            build()
        except (ValueError, TypeError) as exc:
            problems[key] = str(exc)
    return problems


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
