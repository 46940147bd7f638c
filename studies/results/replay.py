"""Re-run one trial of a study exactly: the file's fixed settings, the trial's params and its training seed.

    pcvit-study show-config --storage URL --study-name NAME 17 > trial17.yaml
    pcvit-train --config trial17.yaml --out runs/trial17
    pcvit-study replay --storage URL --study-name NAME 17 --out runs/trial17    # both in one command
    pcvit-study show-trial --storage URL --study-name NAME 17    # its whole record, as JSON

The config comes from the study file stored with the study, so it is the one the trial ran with even when
the file on disk has changed since.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial

from pcvit.cli import main as train_main
from pcvit.config import Config
from storage import mask_password
from studies.studyfile.search import suggest_config
from studies.running.records import record
from studies.studyfile.spec import StudyFileError, StudySpec
from studies.running.worker import open_existing_study


def find_trial(url: str, study_name: str, number: int) -> tuple[FrozenTrial, StudySpec]:
    study, spec = open_existing_study(url, study_name)
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not found:
        raise StudyFileError(f"study {study_name!r} in {mask_password(url)} has no trial {number}")
    return found[0], spec


def trial_config(url: str, study_name: str, number: int) -> dict[str, Any]:
    """Config values of trial `number`: fixed settings + its params + its training seed (user attr `seed`)."""
    trial, spec = find_trial(url, study_name, number)
    try:  # the inverse of sampling is sampling with the trial's own params
        values = suggest_config(optuna.trial.FixedTrial(trial.params), spec)
    except ValueError as exc:  # a param the stored study file samples but the trial lacks
        raise StudyFileError(f"trial {number} of study {study_name!r}: {exc}") from None
    return {**values, "seed": trial.user_attrs.get("seed", values.get("seed", Config.seed))}


def trial_record_json(url: str, study_name: str, number: int) -> str:
    """Everything kept on trial `number` as JSON: state, value, params, reports and its whole record (the
    short user attributes and the `pcvit:` system attributes, `studies.running.records`)."""
    trial, _ = find_trial(url, study_name, number)
    shown = {"number": trial.number, "state": trial.state.name, "value": trial.value, "params": trial.params,
             "intermediate_values": trial.intermediate_values, "record": record(trial)}
    return json.dumps(shown, indent=2, sort_keys=False, default=str) + "\n"


def config_yaml(url: str, study_name: str, number: int) -> str:
    """`pcvit-train --config` YAML for trial `number`, headed by where it came from."""
    values = trial_config(url, study_name, number)
    return (f"# trial {number} of study {study_name!r} in {mask_password(url)}: its params, the study file's "
            f"fixed settings and its training seed\n" + yaml.safe_dump(values, sort_keys=False))


def replay(url: str, study_name: str, number: int, train_args: list[str]) -> int:
    """Run `pcvit-train --config <trial's config> TRAIN_ARGS`; returns pcvit-train's exit code."""
    text = config_yaml(url, study_name, number)
    with tempfile.TemporaryDirectory(prefix=f"pcvit-trial{number}-") as folder:
        config = Path(folder) / "trial.yaml"
        config.write_text(text)
        return train_main(["--config", str(config), *train_args])
