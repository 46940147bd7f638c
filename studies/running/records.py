"""Where a trial's facts are kept: a few short user attributes, the rest as `pcvit:` system attributes.

Users of Optuna read trials first with `optuna trials` and optuna-dashboard; both show every user attribute (the
CLI as one table cell, the dashboard as unwrapped lines). So user attributes are only the short facts a person
reads (`SHOWN`, each explained in the study's note); the bookkeeping (the latest checkpoint, the sampler's
seed, package versions) and the rest of the run's summary are system attributes named `pcvit:<key>`.
`record(trial)` gives both as one dictionary, the way every reader in this package sees a trial.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial

from storage.optuna_access import set_system_attr, set_user_attr, stored_trial

PREFIX = "pcvit:"

SHOWN = {  # user attribute -> what it means (the study's note lists these)
    "best_probe_accuracy": "the best linear-probe accuracy of the top latent over the run's probes",
    "epochs_run": "epochs trained (fewer than planned: stopped early, pruned, diverged or interrupted)",
    "stop_reason": "why training ended: completed, early_stopped, pruned, stopped (a budget), interrupted (a "
                   "signal: retried), diverged (a non-finite energy, MSE or state; the trial is then pruned)",
    "wall_time_s": "seconds of training (the controls not counted)",
    "seed": "the training seed (a retry keeps it; `pcvit-study replay` reruns the trial with it)",
    "worker": "host:pid of the worker that ran the trial",
    "untrained_baseline": "probe of the same network at initialisation (best trials only)",
    "pca_baseline": "probe of a PCA of the pixels to the probed width (best trials only)",
    "raw_patch_baseline": "probe of the patch-averaged pixels (best trials only)",
    "pixel_baseline": "probe of all the pixels: what a code that is an affine map of the image is held to (best "
                      "trials only)",
    "fail_reason": "why the trial failed (a dead worker, an error)",
    "retry_reason": "this trial retries a failed one, and why",
    "resumed_after_epoch": "a retry went on from its predecessor's checkpoint after this epoch",
    "wandb_url": "the trial's W&B run (with --wandb; offline: its folder is `wandb_dir` in the record)",
}


def put(trial: optuna.Trial | FrozenTrial, key: str, value: Any, study: optuna.Study | None = None) -> None:
    """Keep `key`: a user attribute when it is one people read (`SHOWN`), else the system attribute
    `pcvit:<key>`. `study` is needed for a FrozenTrial (a live trial knows its study)."""
    study = study if study is not None else trial.study
    if key in SHOWN:
        set_user_attr(study, trial, key, value)
    else:
        set_system_attr(study, trial, PREFIX + key, value)


def record(trial: FrozenTrial | optuna.Trial, study: optuna.Study | None = None) -> dict[str, Any]:
    """Every fact kept on `trial`, under its plain key (system attributes without their prefix)."""
    if isinstance(trial, optuna.Trial):
        trial = stored_trial(study if study is not None else trial.study, trial)
    hidden = {key[len(PREFIX):]: value for key, value in trial.system_attrs.items() if key.startswith(PREFIX)}
    return {**hidden, **trial.user_attrs}


def glossary() -> list[str]:
    """The study note's lines that explain the user attributes."""
    return [f"- `{key}`: {meaning}" for key, meaning in SHOWN.items()]
