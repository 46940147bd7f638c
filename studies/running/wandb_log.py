"""Optional W&B logging: one W&B run per trial, as the original sweep had one per run.

group = the study, name = `trial-<number>`, config = the trial's params plus its full config,
one log row per epoch (step = epoch, as the original), summary = the run's result with
`best_probe_accuracy` the maximum over all probes. `wandb` is imported only when a run starts.
Mode: $WANDB_MODE if set, else online when WANDB_API_KEY is set, else offline (nothing leaves the
machine; `wandb sync` uploads later). The run id and URL (or offline folder) become trial user attributes.
`wandb.init` gives up after $WANDB_INIT_TIMEOUT seconds (default 30); the trial then goes on without W&B.
Optuna's W&B callback is deprecated and sees only finished trials; a listener sees every epoch.
"""

from __future__ import annotations

import math
import os
from typing import Any

import optuna

from pcvit import Listener, RunResult
from studies.running import records


INIT_TIMEOUT_S = 30  # W&B's own default is 90 s of a GPU idling when its server is out of reach


class WandbListener(Listener):
    """Logs one trial as one W&B run. The objective wraps it in `side_channels.Tolerant`: a W&B failure
    (no network, a server error) costs the W&B run, never the trial."""

    def __init__(self, trial: optuna.Trial, project: str):
        self.trial, self.project = trial, project
        self.wandb_run: Any = None

    def on_start(self, run: Any) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        config = {**run.config.to_dict(), "params": self.trial.params, "trial_number": self.trial.number,
                  "resumed_after_epoch": run.epoch}
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)
        self.wandb_run = wandb.init(project=self.project, group=self.trial.study.study_name,
                                    name=f"trial-{self.trial.number}", config=config, mode=mode,
                                    dir=os.environ.get("WANDB_DIR"), reinit="create_new",
                                    settings=wandb.Settings(init_timeout=timeout))
        records.put(self.trial, "wandb_run_id", self.wandb_run.id)
        records.put(self.trial, "wandb_dir", self.wandb_run.dir)  # `wandb sync` it (offline); a long path: record
        records.put(self.trial, "wandb_url", self.wandb_run.url or f"offline: run {self.wandb_run.id}")

    def on_epoch(self, run: Any, epoch: int, metrics: dict[str, Any]) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}
        self.wandb_run.log(numbers, step=epoch)

    def on_end(self, run: Any, result: RunResult) -> None:
        summary = {k: v for k, v in result.to_dict().items()
                   if isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and math.isnan(v))}
        self.wandb_run.summary.update(summary)
        self.close(0)

    def close(self, exit_code: int = 1) -> None:
        """Finish the W&B run (with a failure code when the trial did not end normally); safe to repeat."""
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
