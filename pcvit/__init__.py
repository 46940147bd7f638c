"""PC-ViT: a predictive-coding vision transformer trained by iterative inference, in PyTorch.

PyTorch only: no Optuna, W&B or database code lives here (the study runner sits on top). The names below are
imported on first use, so that `from pcvit import Listener` (what the study runner's loop needs) does not load
torch: a process that only coordinates trials stays small.
"""

import importlib
import sys
import types
from typing import Any

_HOME = {  # name -> the module that defines it
    "Config": "config", "ConfigError": "config",
    "DatasetError": "data", "ImageData": "data", "load_data": "data",
    "States": "inference", "init_states": "inference", "layer_scales": "inference", "settle_states": "inference",
    "state_grads": "inference",
    "Listener": "listeners", "RunResult": "listeners", "StopReason": "listeners",
    "PCViT": "model", "patchify": "model", "positional_encoding": "model", "unpatchify": "model",
    "hidden_lr": "optim", "lr_at": "optim", "weight_lr": "optim",
    "Controls": "controls", "probe_controls": "controls",
    "extract_features": "probe", "fit_linear_probe": "probe", "probe_accuracy": "probe",
    "Run": "train", "train": "train",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'pcvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


class _Package(types.ModuleType):
    """`pcvit.train` is the function train(), also after the submodule `pcvit.train` is imported (the import
    system then sets the package's attribute to the module; here that assignment keeps the function). The module
    itself: `importlib.import_module("pcvit.train")`."""

    @property
    def train(self) -> Any:
        return __getattr__("train") if "train" not in self.__dict__ else self.__dict__["train"]

    @train.setter
    def train(self, value: Any) -> None:
        if not isinstance(value, types.ModuleType):
            self.__dict__["train"] = value


sys.modules[__name__].__class__ = _Package
