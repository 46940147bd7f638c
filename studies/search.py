"""How a study searches: its sampler and pruner, built from the study file's `sampler` and `pruner`.

The sampler's seed is per worker (from os.urandom), never from the file: workers that share a seed
draw the same trials. Each trial records its worker's seed as the `sampler_seed` user attribute.
"""

from __future__ import annotations

import os
import warnings

import optuna

from studies.spec import StudyFileError, StudySpec, load_spec


def load_study_file(path: str | os.PathLike) -> StudySpec:
    """A study file as every command reads it, before any storage is touched: the schema and every config a trial
    could get (`studies.spec`), then the sampler and pruner Optuna would build from it."""
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
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **options)
    grid = {name: p["choices"] for name, p in spec.space.items()}  # validation made them all categorical
    return optuna.samplers.GridSampler(grid, seed=seed)


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
