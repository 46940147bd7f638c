"""The study file: its schema (declared as data below), parsing, and validation against the core config.

A study file says what to search (`space`), what to hold (`fixed`), how to search (`sampler`, `pruner`),
how much (`n_trials`, for the whole study) and how to survive crashes (`max_retries`, checkpoints,
heartbeat). Every key of `fixed` and `space` is a field of `pcvit.Config`, and every value a trial could
get is checked by building that Config before anything touches the storage, so a bad file fails at
once with the file and key in the message instead of as 500 failed trials.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import pathlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

import yaml

from pcvit.config import Config, ConfigError, coerce, field_names
from studies.studyfile.samplers import build_pruner, build_problems, build_sampler
from studies.studyfile.strict_yaml import load_strict


class StudyFileError(ValueError):
    """An expected user error: a bad study file, or one that disagrees with the stored study."""


# --- the schema, as data ---------------------------------------------------------------------------
SPEC_ATTR = "study_spec"  # study system attr holding the validated study file (user attr in older studies)
TEXT_ATTR = "study_file"  # study system attr holding its text; the user attr of that name names the file

METRICS = {  # metric -> the per-epoch value reported to Optuna for pruning
    "best_probe_accuracy": "probe_accuracy",
    "best_train_mse": "train_mse",
    "final_train_mse": "train_mse",
    "best_val_mse": "val_mse",
}
PARAM_TYPES = {  # type -> {key: (kind, required)}
    "float": {"low": ("number", True), "high": ("number", True), "step": ("number", False), "log": ("bool", False)},
    "int": {"low": ("int", True), "high": ("int", True), "step": ("int", False), "log": ("bool", False)},
    "categorical": {"choices": ("list", True)},
    # 0 or log-uniform: a categorical "<name>_is_zero" flag, then (if false) a log-uniform value in [low, high]
    "zero_or_log": {"low": ("number", True), "high": ("number", True)},
}
SAMPLERS = {  # the model-based ones (tpe, gp) learn from finished trials once n_startup_trials have run
    "random": {}, "grid": {},
    "tpe": {"n_startup_trials": ("int", False), "multivariate": ("bool", False)},
    "gp": {"n_startup_trials": ("int", False), "deterministic_objective": ("bool", False)},
}
_PATIENCE = {"patience": ("int", False), "min_delta": ("number", False)}  # wraps any pruner in PatientPruner
PRUNERS = {
    "none": {},
    "median": {"n_startup_trials": ("int", False), "n_warmup_steps": ("int", False),
               "interval_steps": ("int", False), "n_min_trials": ("int", False), **_PATIENCE},
    "percentile": {"percentile": ("number", True), "n_startup_trials": ("int", False),
                   "n_warmup_steps": ("int", False), "interval_steps": ("int", False),
                   "n_min_trials": ("int", False), **_PATIENCE},
    "successive_halving": {"min_resource": ("int", False), "reduction_factor": ("int", False),
                           "min_early_stopping_rate": ("int", False), **_PATIENCE},
    "hyperband": {"min_resource": ("int", False), "max_resource": ("int", False),
                  "reduction_factor": ("int", False), **_PATIENCE},
}
TOP_LEVEL = {  # key -> (kind, default; None = required)
    "name": ("str", None),
    "description": ("str", ""),
    "direction": ("str", None),
    "metric": ("str", None),
    "sampler": ("dict", {"type": "random"}),
    "pruner": ("dict", {"type": "none"}),
    "n_trials": ("int", None),
    "max_retries": ("int", 3),  # re-runs of a trial whose worker died or was stopped
    "checkpoint_every_n_epochs": ("int", 5),  # 0 = never; a killed trial loses at most this many epochs
    "heartbeat_interval": ("int", 60),  # seconds between a running trial's heartbeats
    "grace_period": ("int", 180),  # seconds without a heartbeat before a trial counts as dead
    "fixed": ("dict", {}),
    "space": ("dict", None),
    "questions": ("list", []),  # [{question: text, params: [names]}] answered by `pcvit-study report`
    "baseline": ("dict", {}),  # {value: number, label: text}: the metric of a reference model, for the report
    "focused_from": ("dict", {}),  # {study: name, trials: [numbers]}: written by `pcvit-study focus`
    "controls": ("bool", True),  # probe the controls (pcvit.controls) of each trial that beats the best so far
}
BASELINE = {"value": ("number", True), "label": ("str", True)}
FOCUSED_FROM = {"study": ("str", True), "trials": ("list", True)}
# Keys the original W&B sweep carried that did nothing in its runs: an error here, a noted drop on import.
NO_EFFECT = {
    "corrupt_ratio": "acts only with use_corruption (off in the original sweep): masked-reconstruction images",
    "use_lower_half_mask": "acts only with use_corruption (off in the original sweep)",
    "inference_clamp_alpha": "acts only with use_corruption (off in the original sweep)",
    "save_reconstruction_video": "reconstruction videos are not implemented (off in the original sweep)",
    "video_fps": "only used by save_reconstruction_video",
    "linear_probe_concatenate_features": "features of several probe nodes are always concatenated",
    "linear_probe_use_gap": "probe features are always patch-averaged (global average pooling)",
    "config": "the original's base-config name; a study file lists every setting under `fixed`",
    "count": "the original's run_sweep.py never read it (W&B agents got --count); use n_trials",
    "model_saving_metric": "weights are saved as Optuna artifacts (final weights, epoch checkpoints)",
    "save_model_train_mse_threshold": "weights are saved as Optuna artifacts; the 0.0008 MSE milestone "
                                      "still triggers validation and an image",
}

class _Key:
    """`spec.n_trials` reads `spec.document["n_trials"]`: one named attribute per top-level key."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, spec: "StudySpec", owner: type | None = None) -> Any:
        return spec.document[self.key]


@dataclass(frozen=True)
class StudySpec:
    """A validated study file. `document` is its canonical content, stored with the study; each top-level key
    reads as an attribute (`spec.n_trials`)."""

    source: str  # the file name, for messages
    document: dict[str, Any]
    text: str = ""

    # what the study is
    name = _Key()  # str
    description = _Key()  # str
    direction = _Key()  # str
    metric = _Key()  # str
    # how and how much it searches
    sampler = _Key()  # dict[str, Any]
    pruner = _Key()  # dict[str, Any]
    n_trials = _Key()  # int
    fixed = _Key()  # dict[str, Any]
    space = _Key()  # dict[str, dict]
    questions = _Key()  # list[dict]
    # how it survives crashes
    max_retries = _Key()  # int
    checkpoint_every_n_epochs = _Key()  # int
    heartbeat_interval = _Key()  # int
    grace_period = _Key()  # int

    @property
    def baseline(self) -> dict[str, Any] | None:  # optional: absent from studies stored before it existed
        return self.document.get("baseline")

    @property
    def focused_from(self) -> dict[str, Any] | None:  # optional: only in a study file `pcvit-study focus` wrote
        return self.document.get("focused_from")

    @property
    def controls(self) -> bool:  # left out of the document when true (the default)
        return self.document.get("controls", True)

    def make_sampler(self, seed: int) -> Any:
        """This worker's Optuna sampler (see `studies.studyfile.samplers` for the seeds)."""
        return build_sampler(self.sampler, self.space, seed)

    def make_pruner(self) -> Any:
        return build_pruner(self.pruner)

    def config_dict(self, values: dict[str, Any]) -> dict[str, Any]:
        """The config a trial runs with: fixed settings plus the sampled `values` (config field -> value)."""
        return {**self.fixed, **values}


def param_value(params: dict[str, Any], name: str, param: dict) -> Any:
    """The value Optuna params give parameter `name`: for zero_or_log, 0 when its `<name>_is_zero` flag is set."""
    if param["type"] == "zero_or_log" and params.get(f"{name}_is_zero"):
        return 0.0
    return params.get(name)


def load_spec(path: str | pathlib.Path) -> StudySpec:
    """The one reader of a study file: the schema, every config a trial could get, and the sampler and pruner
    Optuna would build from it, all checked before any storage is touched."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise StudyFileError(f"{path}: cannot read the study file ({exc.strerror})") from None
    return parse_spec(text, str(path))


def parse_spec(text: str, source: str) -> StudySpec:
    try:
        raw = load_strict(text)
    except yaml.YAMLError as exc:
        raise StudyFileError(f"{source}: not valid YAML: {exc}") from None
    return validate(raw, source, text)


def spec_from_document(document: dict[str, Any], source: str, text: str = "") -> StudySpec:
    """A study file's content that is not a file (stored with a study, made from a W&B sweep), checked as one."""
    return validate(document, source, text)


def validate(raw: Any, source: str, text: str = "") -> StudySpec:
    """Check `raw` against the schema and the core config; return the canonical spec or raise StudyFileError."""
    def fail(key: str, message: str) -> StudyFileError:
        return StudyFileError(f"{source}: {key}: {message}")

    if not isinstance(raw, dict):
        raise StudyFileError(f"{source}: a study file is a mapping of keys ({', '.join(TOP_LEVEL)})")
    doc = _check_keys(raw, {k: (kind, default is None) for k, (kind, default) in TOP_LEVEL.items()}, "", fail)
    for key, (_, default) in TOP_LEVEL.items():
        doc.setdefault(key, json.loads(json.dumps(default)))
    doc["baseline"] = _check_keys(doc["baseline"], BASELINE, "baseline", fail) if doc["baseline"] else None
    if doc["baseline"] is None:  # left out, so that studies stored before the key existed still compare equal
        del doc["baseline"]
    if doc["controls"] is True:  # the default: left out for the same reason
        del doc["controls"]
    if doc["focused_from"]:
        doc["focused_from"] = _check_keys(doc["focused_from"], FOCUSED_FROM, "focused_from", fail)
    else:
        del doc["focused_from"]
    if doc["direction"] not in ("maximize", "minimize"):
        raise fail("direction", f"must be maximize or minimize, got {doc['direction']!r}")
    if doc["metric"] not in METRICS:
        raise fail("metric", f"unknown metric {doc['metric']!r} (known: {', '.join(METRICS)})")
    for key in ("n_trials", "heartbeat_interval", "grace_period"):
        if doc[key] < 1:
            raise fail(key, f"must be >= 1, got {doc[key]}")
    for key in ("max_retries", "checkpoint_every_n_epochs"):
        if doc[key] < 0:
            raise fail(key, f"must be >= 0, got {doc[key]}")
    if doc["grace_period"] <= doc["heartbeat_interval"]:
        raise fail("grace_period", f"must exceed heartbeat_interval ({doc['heartbeat_interval']} s), "
                                   f"got {doc['grace_period']} s: live trials would be reaped")
    if isinstance(doc["sampler"], dict) and "seed" in doc["sampler"]:
        raise fail("sampler.seed", "not allowed: every worker seeds its own sampler (a shared seed makes "
                                   "all workers sample the same trials)")
    doc["sampler"] = _check_typed(doc["sampler"], SAMPLERS, "sampler", fail)
    doc["pruner"] = _check_typed(doc["pruner"], PRUNERS, "pruner", fail)
    for name, value in doc["fixed"].items():
        _check_field(name, f"fixed.{name}", fail)
        doc["fixed"][name] = _check_fixed_value(name, value, fail)
    space = {}
    for name, param in doc["space"].items():
        _check_field(name, f"space.{name}", fail)
        if name in doc["fixed"]:
            raise fail(f"space.{name}", "is also in `fixed`: a parameter is either sampled or fixed")
        space[name] = _check_param(name, param, fail)
    doc["space"] = space
    if doc["sampler"]["type"] == "grid":
        for name, param in space.items():
            if param["type"] != "categorical":
                raise fail(f"space.{name}.type", "the grid sampler needs categorical parameters (list the grid)")
    _check_questions(doc["questions"], space, fail)
    _check_configs(doc["fixed"], space, fail)
    _check_metric_is_measured(doc["metric"], doc["fixed"], space, fail)
    for key, problem in build_problems(doc["sampler"], doc["pruner"], space).items():
        raise fail(key, problem)
    return StudySpec(source, doc, text)


# --- the study file stored with a study -----------------------------------------------------------------
def stored_document(study: Any) -> tuple[dict[str, Any] | None, str]:
    """The study file stored with `study`: (its canonical document or None, its text). Kept in the study's
    system attributes, where `optuna studies` does not print them (studies stored before: user attributes)."""
    from storage.optuna_access import study_system_attrs

    attrs = study_system_attrs(study)
    if SPEC_ATTR in attrs:
        return attrs[SPEC_ATTR], attrs.get(TEXT_ATTR, "")
    return study.user_attrs.get(SPEC_ATTR), study.user_attrs.get(TEXT_ATTR, "") if SPEC_ATTR in study.user_attrs else ""


def stored_spec(study: Any, source: str) -> "StudySpec | None":
    """The study file stored with `study`, checked as any study file (`source` names it in messages); None when
    no worker has stored one yet."""
    document, text = stored_document(study)
    return None if document is None else spec_from_document(document, source, text)


def store_document(study: Any, spec: "StudySpec") -> None:
    """Store `spec` with `study` (system attributes), and its file's name as a short user attribute."""
    from storage.optuna_access import set_study_system_attr

    set_study_system_attr(study, TEXT_ATTR, spec.text)
    set_study_system_attr(study, SPEC_ATTR, canonical(spec.document))
    study.set_user_attr(TEXT_ATTR, pathlib.Path(spec.source).name)


# --- pieces ----------------------------------------------------------------------------------------
def _check_keys(mapping: Any, schema: dict[str, tuple[str, bool]], where: str, fail: Callable) -> dict:
    prefix = f"{where}." if where else ""
    if not isinstance(mapping, dict):
        raise fail(where or "(top level)", f"must be a mapping, got {mapping!r}")
    for key in mapping:
        if key not in schema:
            hint = f" ({NO_EFFECT[key]})" if key in NO_EFFECT else did_you_mean(key, schema)
            raise fail(f"{prefix}{key}", f"unknown key{hint}; known: {', '.join(schema) or 'none'}")
    out = {}
    for key, (kind, required) in schema.items():
        if key not in mapping:
            if required:
                raise fail(f"{prefix}{key}", "is required")
            continue
        out[key] = _check_kind(mapping[key], kind, f"{prefix}{key}", fail)
    return out


def _check_kind(value: Any, kind: str, key: str, fail: Callable) -> Any:
    if kind == "number" and isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as text
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "dict": isinstance(value, dict),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        raise fail(key, f"expected {kind}, got {value!r}")
    return value


def _check_typed(mapping: Any, kinds: dict[str, dict], where: str, fail: Callable) -> dict:
    if not isinstance(mapping, dict) or "type" not in mapping:
        raise fail(f"{where}.type", f"is required (one of: {', '.join(kinds)})")
    kind = mapping["type"]
    if kind not in kinds:
        raise fail(f"{where}.type", f"unknown {where} {kind!r} (known: {', '.join(kinds)})")
    checked = _check_keys({k: v for k, v in mapping.items() if k != "type"}, kinds[kind], where, fail)
    for key, value in checked.items():
        if value < 0:
            raise fail(f"{where}.{key}", f"must be >= 0, got {value}")
    return {"type": kind, **checked}


def _check_field(name: str, key: str, fail: Callable) -> None:
    if name in NO_EFFECT:
        raise fail(key, f"has no effect in the original sweep and is not a pcvit setting: {NO_EFFECT[name]}")
    if name not in field_names():
        raise fail(key, f"unknown parameter{did_you_mean(name, field_names())}: not a pcvit config field "
                        "(`pcvit-train --list-fields` lists them)")


def did_you_mean(word: str, known: Any) -> str:
    """` (did you mean 'x'?)` for the closest known name, or nothing when none is close."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_fixed_value(name: str, value: Any, fail: Callable) -> Any:
    """A fixed value in its field's type: an integer field takes no text ("4" is refused, not guessed), a float
    field also takes text YAML left unparsed (5e-4), a text field also a number (`residual_branch_scale: 1`)."""
    kind = _field_kind(name)
    wrong = (kind is int and (not isinstance(value, int) or isinstance(value, bool))
             or kind is bool and not isinstance(value, bool)
             or kind is float and (isinstance(value, bool) or not isinstance(value, (int, float, str))))
    if wrong:
        shown = {int: "an integer", bool: "true or false", float: "a number"}[kind]
        raise fail(f"fixed.{name}", f"must be {shown}, got {value!r} ({type(value).__name__})")
    try:
        return list(coerced) if isinstance(coerced := coerce(name, value), tuple) else coerced
    except ConfigError as exc:
        raise fail(f"fixed.{name}", f"{exc} (got {value!r})") from None


def _field_kind(name: str) -> type:
    return tuple if name == "linear_probe_vode_indices" else type(getattr(Config, name))


def _check_param(name: str, param: Any, fail: Callable) -> dict:
    key = f"space.{name}"
    if not isinstance(param, dict) or "type" not in param:
        raise fail(f"{key}.type", f"is required: one of {', '.join(PARAM_TYPES)}")
    if param["type"] not in PARAM_TYPES:
        raise fail(f"{key}.type", f"unknown type {param['type']!r} (known: {', '.join(PARAM_TYPES)})")
    kind, field_kind = param["type"], _field_kind(name)
    p = {"type": kind, **_check_keys({k: v for k, v in param.items() if k != "type"}, PARAM_TYPES[kind], key, fail)}
    if kind == "categorical":
        if not p["choices"]:
            raise fail(f"{key}.choices", "is empty")
        choices = []
        for i, choice in enumerate(p["choices"]):
            if field_kind is tuple:  # Optuna choices are scalars: keep "0 1" and let the config parse it
                if not isinstance(choice, (str, int)) or isinstance(choice, bool):
                    raise fail(f"{key}.choices[{i}]", f"write node lists as text like \"0 1\", got {choice!r}")
                choices.append(choice)
                continue
            try:
                choices.append(coerce(name, choice))
            except ConfigError as exc:
                raise fail(f"{key}.choices[{i}]", str(exc).split(": ", 1)[1]) from None
        if len(set(map(repr, choices))) != len(choices):
            raise fail(f"{key}.choices", f"has duplicates: {choices}")
        p["choices"] = choices
        return p
    if kind == "float" and field_kind is int:
        raise fail(f"{key}.type", f"{name} is an integer setting: use type int")
    if kind == "zero_or_log" and field_kind is not float:
        raise fail(f"{key}.type", f"{name} is not a number setting")
    if field_kind not in (int, float):
        raise fail(f"{key}.type", f"{name} is a {field_kind.__name__} setting: use type categorical")
    low, high = p["low"], p["high"]
    if low > high or (low == high and kind != "int"):
        raise fail(f"{key}", f"empty range: low {low} must be below high {high}")
    if (p.get("log") or kind == "zero_or_log") and low <= 0:
        raise fail(f"{key}.low", f"a log range needs low > 0, got {low}")
    if "step" in p:
        if p.get("log"):
            raise fail(f"{key}.step", "cannot be combined with log (Optuna samples one or the other)")
        if p["step"] <= 0:
            raise fail(f"{key}.step", f"must be > 0, got {p['step']}")
        # Optuna would quietly lower `high` to the last step below it (and only warn in the log)
        if (Decimal(str(high)) - Decimal(str(low))) % Decimal(str(p["step"])) != 0:
            raise fail(f"{key}.step", f"{p['step']} does not divide the range [{low}, {high}]: Optuna would "
                                      "sample a narrower range; choose a step that does, or change low/high")
    return p


def param_values(param: dict) -> list[Any]:
    """The values of a parameter that validation tries: every choice, the ends of a range, all of a short int grid."""
    kind = param["type"]
    if kind == "categorical":
        return list(param["choices"])
    if kind == "zero_or_log":
        return [0.0, param["low"], param["high"]]
    if kind == "int":
        grid = range(param["low"], param["high"] + 1, param.get("step", 1))
        return list(grid) if len(grid) <= 100 else [grid[0], grid[-1]]
    return [param["low"], param["high"]]


def _check_configs(fixed: dict, space: dict, fail: Callable) -> None:
    """Build a Config for every value of every parameter, and for every pair of values of two parameters.

    Every constraint of the config involves at most two fields (heads vs width, patch vs dataset, probe
    nodes vs depth), so checking all pairs finds every value combination the config would reject.
    """
    values = {name: param_values(p) for name, p in space.items()}
    base = {name: v[0] for name, v in values.items()}

    def build(changes: dict[str, Any]) -> None:
        try:
            Config.from_dict({**fixed, **base, **changes})
        except ConfigError as exc:
            where = [f"space.{k} = {v!r}" for k, v in changes.items()] or ["fixed"]
            culprit = exc.field if exc.field in fixed or exc.field in space else None
            key = (f"fixed.{culprit}" if culprit in fixed else f"space.{culprit}") if culprit else " with ".join(where)
            raise fail(key, f"rejected by the config ({' with '.join(where)}): {exc}") from None

    build({})
    for name, vals in values.items():
        for v in vals:
            build({name: v})
    for (a, va), (b, vb) in itertools.combinations(values.items(), 2):
        for x, y in itertools.product(va, vb):
            build({a: x, b: y})


def _check_metric_is_measured(metric: str, fixed: dict, space: dict, fail: Callable) -> None:
    """`best_probe_accuracy` with the probe off (or due after the last epoch) would complete every trial with 0."""
    if metric != "best_probe_accuracy":
        return
    every_key, epochs_key = "linear_probe_every_n_epochs", "epochs"

    def values(name: str) -> list[tuple[str, Any]]:
        if name in space:
            return [(f"space.{name}", v) for v in param_values(space[name])]
        return [(f"fixed.{name}" if name in fixed else f"{name} (default)", fixed.get(name, getattr(Config, name)))]

    for (key, every), (_, epochs) in itertools.product(values(every_key), values(epochs_key)):
        if every == 0 or every > epochs:
            why = "turns the linear probe off" if every == 0 else f"probes after the last epoch ({epochs})"
            raise fail(key, f"{every} {why}, but the metric best_probe_accuracy is measured by the probe: "
                            "every trial would complete with 0.0")


def _check_questions(questions: list, space: dict, fail: Callable) -> None:
    for i, q in enumerate(questions):
        if not isinstance(q, dict) or set(q) != {"question", "params"} or not isinstance(q["params"], list):
            raise fail(f"questions[{i}]", "must be {question: text, params: [sampled parameter names]}")
        for name in q["params"]:
            if name not in space:
                raise fail(f"questions[{i}].params", f"{name!r} is not a sampled parameter")


def spec_diff(stored: dict[str, Any], mine: dict[str, Any], prefix: str = "") -> list[str]:
    """Lines `key: stored X, this file Y` for every leaf where the two documents differ."""
    lines = []
    for key in sorted(set(stored) | set(mine), key=str):
        a, b = stored.get(key, "<absent>"), mine.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += spec_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: stored {json.dumps(a)}, this file {json.dumps(b)}")
    return lines


def canonical(document: dict[str, Any]) -> dict[str, Any]:
    """The document as JSON would store it (tuples as lists), so stored and fresh specs compare equal."""
    return json.loads(json.dumps(document))
