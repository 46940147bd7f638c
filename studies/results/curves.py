"""One image per trial with its learning curves: train and validation MSE, and probe accuracy, by epoch.

optuna-dashboard plots the reported metric across trials, but not a trial's own MSE; this PNG, uploaded
as an artifact, shows it on the trial's page. Drawn with matplotlib's file-only backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(h["epoch"], h[key]) for h in history
              if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
    return [p[0] for p in points], [p[1] for p in points]


def save_curves(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.2), dpi=100)  # 640 px: full width in a trial note on a 1280-px screen
    mse, probe = figure.subplots(1, 2)
    for key, label in (("train_mse", "train MSE"), ("val_mse", "validation MSE")):
        epochs, values = _series(history, key)
        if values:
            mse.plot(epochs, values, marker="o", markersize=3, label=label)
    if any(v > 0 for v in _series(history, "train_mse")[1] + _series(history, "val_mse")[1]):
        mse.set_yscale("log")
    mse.set(xlabel="epoch", ylabel="MSE", title="reconstruction error")
    if mse.lines:  # a run that diverged in its first epoch has no finite MSE to label
        mse.legend(loc="upper right")
    else:
        mse.text(0.5, 0.5, "no finite MSE (diverged)", ha="center", va="center", transform=mse.transAxes)
    epochs, values = _series(history, "probe_accuracy")
    probe.plot(epochs, values, marker="o", markersize=3, color="tab:green")
    probe.set(xlabel="epoch", ylabel="accuracy", title="linear probe accuracy")
    from matplotlib.ticker import MaxNLocator

    for axes in (mse, probe):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    return path
