"""How a training run talks to the outside: listeners, and the result it returns.

The loop in `train.py` knows nothing of Optuna, W&B or terminals. It calls the listeners it was given;
a listener may ask the run to stop (`run.request_stop(StopReason.PRUNED, why)`), which ends it after the
current callback with that stop reason. Epoch numbers passed to listeners count completed epochs (1-based),
the same step the original logs to W&B.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class StopReason(str, enum.Enum):
    """Why a run ended. A str, so that it is stored, compared and printed as its value."""

    COMPLETED = "completed"  # every epoch ran
    EARLY_STOPPED = "early_stopped"  # the original's early-stopping rule
    DIVERGED = "diverged"  # non-finite energy, MSE or states
    STOPPED = "stopped"  # a listener asked (request_stop), e.g. a budget
    PRUNED = "pruned"  # a listener's pruner asked
    INTERRUPTED = "interrupted"  # a signal or Ctrl-C: the partial epoch is dropped

    __str__ = str.__str__  # f"{reason}" is its value on every Python
    __format__ = str.__format__


STOP_REASONS = tuple(reason.value for reason in StopReason)


class Run(Protocol):
    """What a listener may use of the live run (`train.Run` is the implementation)."""

    config: Any  # the run's Config
    model: Any  # the PCViT being trained
    out_dir: Path | None
    result: "RunResult"  # filled in as the run goes
    stop_request: tuple[StopReason, str] | None

    def request_stop(self, reason: StopReason = StopReason.STOPPED, detail: str = "") -> None: ...

    def interrupt(self, detail: str = "") -> None: ...

    def checkpoint(self) -> dict[str, Any]: ...


class Listener:
    """Base class: override what you need. Every method is called with the live `Run`."""

    wants_batches = False  # on_batch is only called when True

    def on_start(self, run: Run) -> None:
        pass

    def on_batch(self, run: Run, epoch: int, batch: int, metrics: dict[str, Any]) -> None:
        """After every training batch; metrics are 0-d tensors (calling .item() costs a GPU sync)."""

    def on_epoch(self, run: Run, epoch: int, metrics: dict[str, Any]) -> None:
        """After every epoch's bookkeeping (train metrics, validation, probe, images)."""

    def on_probe(self, run: Run, epoch: int, accuracy: float) -> None:
        """After every linear probe, before on_epoch of the same epoch."""

    def on_images(self, run: Run, epoch: int, path: Path) -> None:
        pass

    def on_end(self, run: Run, result: "RunResult") -> None:
        pass


@dataclass
class RunResult:
    """What a run produced. `to_dict()` is the CLI's JSON summary."""

    best_probe_accuracy: float = 0.0  # running max over all probes; 0.0 when never probed (as the original)
    best_train_mse: float = math.inf
    final_train_mse: float = math.nan
    best_val_mse: float = math.inf  # the original's: first validation, then only gains > min_delta; inf if none
    min_val_mse: float = math.inf  # the lowest validation MSE of the run; inf when never validated
    epochs_run: int = 0
    stop_reason: StopReason = StopReason.COMPLETED
    stop_detail: str = ""  # e.g. the listener's reason, or which quantity diverged
    diverged: bool = False
    divergence_epoch: int | None = None
    wall_time_s: float = 0.0
    device: str = "cpu"
    implementation: str = ""  # the config's, set by the run
    precision: str = ""  # the matmul precision used: the config's, with auto resolved for the device
    probe_accuracies: list[float] = field(default_factory=list)
    probe_converged: bool = True  # False when any probe's head was trained too briefly to mean anything
    node_diagnostics: dict[str, Any] = field(default_factory=dict)  # the last epoch's (pcvit/diagnostics.py)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per epoch
    image_paths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: jsonable(v) for k, v in dataclasses.asdict(self).items()}


def significant(value: Any, digits: int = 4) -> Any:
    """`value` to `digits` significant digits, also inside lists and dicts; non-finite floats and non-floats
    as they are (the one rounding helper: float32 noise is no information)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [significant(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: significant(v, digits) for k, v in value.items()}
    return value


def jsonable(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings so a summary always parses (the one place that does)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value
