"""PC-ViT: a predictive-coding vision transformer trained by iterative inference, in PyTorch.

PyTorch only: no Optuna, W&B or database code lives here (the study runner sits on top).
"""

import warnings

from .config import Config, ConfigError
from .data import DatasetError, ImageData, load_data
from .inference import States, init_states, layer_scales, settle_states, state_grads
from .listeners import Listener, RunResult, StopReason
from .model import PCViT, patchify, positional_encoding, unpatchify
from .optim import hidden_lr, lr_at, weight_lr
from .controls import Controls, probe_controls
from .probe import extract_features, fit_linear_probe, probe_accuracy
from .train import Run, train

__all__ = [
    "Config", "ConfigError", "Controls", "DatasetError", "ImageData", "Listener", "PCViT", "Run", "RunResult", "States",
    "StopReason",
    "extract_features", "fit_linear_probe", "hidden_lr", "init_states", "layer_scales", "load_data", "lr_at",
    "patchify", "positional_encoding", "probe_accuracy", "probe_controls", "settle_states", "state_grads",
    "train", "unpatchify", "weight_lr",
]

# `python -m pcvit.data` runs a module this package has already imported; runpy's warning about it is noise
warnings.filterwarnings("ignore", message=r"'pcvit\.data' found in sys\.modules", category=RuntimeWarning)
