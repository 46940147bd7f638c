"""Optuna objective and worker for PC-ViT studies.

The objective samples a PC-ViT config from the study file's `space` with `trial.suggest_*`, trains it
(the dataset is loaded once per worker and reused), reports the study's metric to Optuna after every
epoch that measures it (the linear-probe accuracy for `best_probe_accuracy`), stops when the pruner says
so, and returns the metric. Along the way it uploads reconstruction grids, the per-epoch metrics and the
final weights as Optuna artifacts, and every `checkpoint_every_n_epochs` a checkpoint from which a
retried trial resumes.

A diverged trial (non-finite energy, MSE or states) keeps what it measured before it diverged, as the
original's runs do: with a metric value (e.g. a probe before the NaN) it ends COMPLETE with that value, so
the study's best can be a run that later diverged; with none it ends PRUNED. Either way the user
attributes diverged/divergence_epoch/reason say so. Divergence is an outcome of the parameters, not a
crash: FAIL is kept for broken infrastructure (crash, OOM), which is what retries and `optuna trials`
FAIL counts are about.

    python objective.py --study-file studies/smoke.yaml                        # SQLite under storage/
    python objective.py --storage URL --study-name NAME [--study-file FILE] [--n-trials N]

Installed as `pcvit-worker`. The storage URL may also come from $OPTUNA_STORAGE.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch

import storage
from pcvit import Config, DatasetError, Listener, RunResult, StopReason, load_data, probe_controls, train
from pcvit.controls import linearity
from pcvit.listeners import significant
from storage.optuna_access import DB_PATIENCE_S, retrying, stored_trial, study_id, trial_id
from storage.checkpoints import CheckpointFiles
from studies.running import records, retries
from studies.results.curves import save_curves
from studies.results.dashboard_notes import save_note, trial_note, update_study_note
from studies.studyfile.samplers import new_sampler_seed
from studies.studyfile.search import representative_params, suggest_config
from studies.running.progress import EpochLine
from studies.running.proxy_reaper import wait_for_proxy_reaper
from studies.running.side_channels import Tolerant, best_effort
from studies.studyfile.spec import METRICS, StudyFileError, StudySpec, load_spec
from studies.running.stopping import SignalGuard, StopOnSignal, WorkerStopped
from studies.running.worker import join_study, run_worker
from studies.running.launch import EXIT_STORAGE_UNREACHABLE
from studies.running.worker_args import parse_worker_args

log = logging.getLogger("pcvit.objective")
RESULT_ATTRS = ("best_probe_accuracy", "best_train_mse", "final_train_mse", "best_val_mse", "epochs_run",
                "stop_reason", "stop_detail", "diverged", "divergence_epoch", "wall_time_s", "device",
                "implementation", "precision", "min_val_mse", "probe_converged")


def objective(trial: optuna.Trial, spec: StudySpec, store: Any, checkpoints: CheckpointFiles,
              wandb_project: str | None = None, guard: SignalGuard | None = None) -> float:
    """Suggest a config, train it (a retry goes on from its checkpoint), report and prune, return the metric."""
    config = trial_config(trial, spec)
    resume = load_resume_point(trial, checkpoints)
    listeners = trial_listeners(trial, spec, store, checkpoints, wandb_project, guard)  # reports, checkpoints, pictures

    with tempfile.TemporaryDirectory(prefix=f"pcvit-trial{trial.number}-") as out_dir:
        try:
            result = train(config, data=load_data(config), listeners=listeners, out_dir=out_dir, resume=resume)
        finally:
            for listener in listeners:
                getattr(listener, "close", lambda: None)()  # W&B: marks the run failed if training did not return

    if result.stop_reason is StopReason.INTERRUPTED:  # a signal: the worker re-queues the trial
        raise WorkerStopped(guard.signum if guard and guard.signum else signal.SIGTERM)
    summary = record_result(trial, result)
    value = measured_value(result, spec.metric)
    if spec.controls and result.probe_accuracies and result.stop_reason is not StopReason.PRUNED \
            and beats_the_best(trial.study, value):
        summary.update(record_controls(trial, config, listeners[0].probe_features))
    _note_trial(trial, summary, result.history, listeners[0].pictures)
    if result.stop_reason is StopReason.PRUNED:
        raise optuna.TrialPruned(f"pruned after epoch {result.epochs_run}")
    if value is None:
        raise optuna.TrialPruned(f"diverged in epoch {result.divergence_epoch} before any {spec.metric}: "
                                 f"{result.stop_detail}")
    return value


def trial_config(trial: optuna.Trial, spec: StudySpec) -> Config:
    """The trial's config: the file's fixed settings, one suggestion per `space` parameter, and a training
    seed (the file's, else drawn once per trial and kept by its retries), recorded as a user attribute."""
    values = suggest_config(trial, spec)
    config = Config.from_dict({**values, "seed": values.get("seed", trial.user_attrs.get("seed",
                                                                                        secrets.randbelow(2**31)))})
    records.put(trial, "seed", config.seed)
    return config


def trial_listeners(trial: optuna.Trial, spec: StudySpec, store: Any, checkpoints: CheckpointFiles,
                    wandb_project: str | None, guard: SignalGuard | None) -> list[Listener]:
    """Optuna (reports, pruning, checkpoints, artifacts), the worker's stop signal, and W&B if asked for."""
    listeners: list[Listener] = [OptunaListener(trial, spec, store, checkpoints), EpochLine(trial.number)]
    if guard is not None:
        listeners.append(StopOnSignal(guard))
    if wandb_project:
        from studies.running.wandb_log import WandbListener

        listeners.append(Tolerant(WandbListener(trial, wandb_project), "W&B"))  # W&B failures only warn
    return listeners


def load_resume_point(trial: optuna.Trial, checkpoints: CheckpointFiles) -> dict[str, Any] | None:
    """The checkpoint a retried trial goes on from (None: start afresh)."""
    checkpoint = records.record(trial).get(retries.CHECKPOINT)
    if not checkpoint:
        return None
    try:
        resume = checkpoints.load(checkpoint["id"])
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("trial %d: checkpoint unreadable (%s); starting from epoch 0", trial.number, exc)
        return None
    records.put(trial, "resumed_after_epoch", resume["epoch"])
    if checkpoint.get("trained"):
        log.info("trial %d was trained by an earlier attempt; recording its result without training again",
                 trial.number)
    else:
        log.info("trial %d resumes after epoch %d", trial.number, resume["epoch"])
    return resume


def measured_value(result: RunResult, metric: str) -> float | None:
    """The trial's value of `metric`, or None when the run never measured it (diverged before the first probe,
    or before any finite MSE). A diverged run keeps the best value it measured before the NaN."""
    value = significant(float(getattr(result, metric)), 6)
    if not result.diverged:
        return value
    if metric == "best_probe_accuracy" and not result.probe_accuracies:
        return None
    return value if math.isfinite(value) else None


def record_result(trial: optuna.Trial, result: RunResult) -> dict[str, Any]:
    """The per-trial record: the run's summary, divergence, and the versions that produced it. Returns the
    rounded summary (`result_attrs`) it stored."""
    summary = result_attrs(result)
    for key in RESULT_ATTRS:  # a few shown to people, the rest kept as system attributes (`records`)
        records.put(trial, key, summary[key])
    records.put(trial, "node_diagnostics", summary["node_diagnostics"])  # last epoch; every epoch: metrics.jsonl
    records.put(trial, "versions", " · ".join(f"{k} {v}" for k, v in package_versions().items()))
    return summary


def beats_the_best(study: optuna.Study, value: float | None) -> bool:
    """True when `value` would be the study's best so far (the first measured value is)."""
    if value is None:
        return False
    try:
        best = study.best_value
    except ValueError:  # no completed trial yet
        return True
    return value > best if study.direction == optuna.study.StudyDirection.MAXIMIZE else value < best


def record_controls(trial: optuna.Trial, config: Config,
                    probe_features: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Probe the trial's controls (the same network untrained, a PCA of the pixels, raw patches) and store
    them as user attributes (`untrained_baseline`, `pca_baseline`, ...); the report sets the best trial beside
    them. With the run's last probe features, also how affine in the pixels they are (`feature_linearity_r2`,
    beside the untrained network's `untrained_linearity_r2`). Only for a trial that beats the study's best so
    far (the best trial always has them; they cost about one probe each time), and not with `controls: false`
    in the study file."""
    data = load_data(config)
    controls = best_effort(f"the controls of trial {trial.number}", probe_controls, data, config)
    summary = {} if controls is None else controls.summary()
    if controls is not None and controls.untrained_linearity is not None and probe_features is not None:
        trained = best_effort(f"the linearity of trial {trial.number}", linearity, data,
                              data.test_images[: config.test_subset], *probe_features)
        if trained is not None:
            summary["feature_linearity_r2"] = round(trained, 4)
    for key, value in summary.items():
        records.put(trial, key, value)
    return summary


def result_attrs(result: RunResult) -> dict[str, Any]:
    """The run's summary as user attributes, rounded to the digits that mean something (seconds to 0.1 s).
    Non-finite numbers are "inf"/"nan" strings: JSON (and the dashboard) can read them."""
    return {key: round(value, 1) if key.endswith("_s") and isinstance(value, float) else significant(value)
            for key, value in result.to_dict().items()}


def _note_trial(trial: optuna.Trial, summary: dict[str, Any], history: list[dict[str, Any]],
                pictures: dict[str, str]) -> None:
    """A few lines on the trial's page in optuna-dashboard: what happened, and its pictures at full size (the
    artifact list shows thumbnails only); a convenience: failures only warn."""
    best_effort(f"the note of trial {trial.number}", save_note, trial,
                trial_note(trial.number, {**summary, "history": history}, records.record(trial).get("resumed_after_epoch"),
                           pictures))


class OptunaListener(Listener):
    """Reports the metric, prunes, checkpoints the run for a retry to resume from, and uploads its artifacts
    (images as they come; at the end the per-epoch metrics and the final weights)."""

    def __init__(self, trial: optuna.Trial, spec: StudySpec, store: Any, checkpoints: CheckpointFiles):
        self.trial, self.spec, self.store, self.checkpoints = trial, spec, store, checkpoints
        self.report_key = METRICS[spec.metric]
        frozen = stored_trial(trial.study, trial)
        self.reported = set(frozen.intermediate_values)  # a retry's earlier reports
        self.lineage = retries.lineage(study_id(trial.study), frozen)
        self.checkpoint = records.record(trial).get(retries.CHECKPOINT) or {}
        self.pictures: dict[str, str] = {}  # file name -> the dashboard's URL of the uploaded image
        self.probe_features = None  # (train, test) features of the run's last probe, for the controls

    def on_epoch(self, run: Any, epoch: int, metrics: dict[str, Any]) -> None:
        value = metrics.get(self.report_key)
        if value is not None and epoch not in self.reported:
            self.trial.report(significant(value, 6), epoch)
            self.reported.add(epoch)
            if self.trial.should_prune():
                run.request_stop(StopReason.PRUNED, f"the pruner stopped it after epoch {epoch}")
        every = self.spec.checkpoint_every_n_epochs
        ongoing = (run.stop_request is None and run.result.stop_reason is StopReason.COMPLETED
                   and epoch < run.config.epochs)
        if every and ongoing and epoch % every == 0:
            self.save_checkpoint(run.checkpoint(), epoch)

    def on_images(self, run: Any, epoch: int, path: Path) -> None:
        self.upload(path)

    def on_end(self, run: Any, result: RunResult) -> None:
        self.probe_features = run.last_probe_features
        if result.stop_reason is StopReason.INTERRUPTED:
            return  # the retry resumes from the last checkpoint
        if self.spec.checkpoint_every_n_epochs and not self.checkpoint.get("trained"):
            # kept until the worker has stored the result: a retry after a kill records it, not retrains
            self.save_checkpoint(run.checkpoint(), result.epochs_run, trained=True)
        if run.out_dir is None:
            return
        curves = best_effort("drawing curves.png", save_curves, result.history, run.out_dir / "curves.png",
                             f"trial {self.trial.number}: {result.stop_reason}")
        if curves is not None:
            self.upload(curves)
        self.upload(run.out_dir / "metrics.jsonl")  # the whole run's: a resumed run writes what it inherited
        if not result.diverged:
            weights = run.out_dir / "final_weights.pt"
            if best_effort("saving the final weights", lambda: torch.save(run.model.state_dict(), weights) or True):
                self.upload(weights)

    def save_checkpoint(self, checkpoint: dict[str, Any], epoch: int, trained: bool = False) -> None:
        """Write the checkpoint, point the trial at it in one write, then drop the older ones."""
        new_id = best_effort(f"checkpoint of trial {self.trial.number} after epoch {epoch}",
                             self.checkpoints.save, self.lineage, checkpoint)
        if new_id is None:
            return
        self.checkpoint = {"id": new_id, "epoch": epoch, "trained": trained}
        records.put(self.trial, retries.CHECKPOINT, self.checkpoint)
        self.checkpoints.remove_lineage(self.lineage, keep=new_id)  # only the latest is ever needed

    def upload(self, path: Path) -> None:
        mimetype = {".png": "image/png", ".jsonl": "text/plain"}.get(path.suffix, "application/octet-stream")
        artifact = best_effort(f"upload of {path.name}", optuna.artifacts.upload_artifact, artifact_store=self.store,
                               file_path=str(path), study_or_trial=self.trial, mimetype=mimetype)
        if artifact is not None and path.suffix == ".png":  # shown full width in the trial's note
            self.pictures[path.name] = f"/artifacts/{study_id(self.trial.study)}/{trial_id(self.trial)}/{artifact}"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Python, torch, CUDA, optuna, numpy and the code's commit ($PCVIT_CODE_VERSION in images without git)."""
    import platform
    import subprocess

    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
                "numpy": numpy.__version__, "cuda": str(torch.version.cuda)}
    code = os.environ.get("PCVIT_CODE_VERSION")
    if not code:
        try:
            here = Path(__file__).resolve().parent
            code = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            code = ""
    versions["code"] = code or "unknown"
    return versions


def check_dataset(spec: StudySpec) -> None:
    """Load the data a trial would (then cached for the worker's trials): DatasetError if it is missing."""
    load_data(Config.from_dict(suggest_config(optuna.trial.FixedTrial(representative_params(spec)), spec)))


def main(argv: list[str] | None = None) -> int:
    args = parse_worker_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage.resolve_url(args.storage)
    try:
        spec = load_spec(args.study_file) if args.study_file else None
        if spec is not None:
            check_dataset(spec)  # a missing dataset fails before the storage is touched
        elif not args.study_name:
            raise StudyFileError("give --study-name NAME or --study-file FILE")
        sampler_seed = new_sampler_seed()
        db = storage.wait_for_storage(url, check_budget=True, patience_s=storage.STARTUP_PATIENCE_S)
        db = retrying(db, patience_s=storage.STARTUP_PATIENCE_S)  # every storage call waits out an outage
        study, spec = join_study(db, url, args.study_name, spec, sampler_seed)
        if storage.is_proxy_url(url):  # behind a proxy, dead workers' trials are reaped by the proxy's process only
            wait_for_proxy_reaper(study, url)
        if not args.study_file:
            check_dataset(spec)
        db.patience_s = DB_PATIENCE_S  # joined: from now on a trial waits longer before it gives up
    except (storage.StorageUnreachable, *storage.DB_UNREACHABLE) as exc:  # come back later: not bad input
        print(f"pcvit-worker: storage unreachable: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_STORAGE_UNREACHABLE
    except (StudyFileError, storage.StorageError, DatasetError) as exc:
        print(f"pcvit-worker: error: {exc}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():  # "experimental"; the dashboard labels its axes with it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        best_effort("naming the study's metric", study.set_metric_names, [spec.metric])
    store = storage.artifact_store(args.artifact_dir)
    checkpoints = CheckpointFiles(storage.artifact_folder(args.artifact_dir))
    log.info("worker joins study %r in %s (sampler seed %d)", study.study_name, storage.mask_password(url),
             sampler_seed)

    guard = SignalGuard()  # the worker's: installed by its loop, heard by each trial's training run

    def run_objective(trial: optuna.Trial) -> float:
        if "sampler_seed" not in records.record(trial):  # a retry keeps the seed that sampled its params
            records.put(trial, "sampler_seed", sampler_seed)
        try:
            return objective(trial, spec, store, checkpoints, args.wandb, guard)
        finally:
            update_study_note(study, spec)  # before the trial is told: the report lags one trial behind

    code = run_worker(study, spec, run_objective, args.n_trials, checkpoints, guard)
    update_study_note(study, spec)
    return code


if __name__ == "__main__":
    sys.exit(main())
