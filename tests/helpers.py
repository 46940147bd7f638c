"""What the tests share: the repository root, the tiny configs, and tiny models, states, images and studies.

Two tiny configs, for two kinds of test:
* `TINY` (core tests): 2 blocks of width 16 with 2 heads, so attention heads, depth stacking and every node
  are exercised; a handful of synthetic images, on the CPU.
* `TINY_FIXED` (runner tests): the `fixed` settings of a tiny study file, a 1-block, width-8 PC-ViT on 100
  synthetic images: about a second per trial on one CPU thread. Workers run as `sys.executable objective.py
  ...` with one torch thread each, so several of them share two cores without thrashing.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import optuna
import torch
import yaml

from pcvit import Config, PCViT, States
from pcvit.inference import init_states
from studies.running.records import record

REPO = pathlib.Path(__file__).resolve().parents[1]

# --- the core ------------------------------------------------------------------------------------------
TINY = dict(dataset="synthetic", num_blocks=2, hidden_size=16, num_heads=2, batch_size=8, train_subset=64,
            test_subset=32, validation_subset=16, epochs=2, inference_steps=3, device="cpu",
            linear_probe_batch_size=16)


def tiny_config(**changes) -> Config:
    return Config(**{**TINY, **changes})


def tiny_model(config: Config, seed: int = 0, channels: int = 3, image_size: int = 32) -> PCViT:
    """A model whose LayerNorm gains/biases are moved off 1/0, so a misplaced one shows."""
    generator = torch.Generator().manual_seed(seed)
    model = PCViT(config, channels, image_size, generator=generator)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def random_states(model: PCViT, batch: int, seed: int = 1, scale: float = 1.0) -> States:
    """States with non-zero errors at every node: the INIT forward plus noise."""
    generator = torch.Generator().manual_seed(seed)
    states = init_states(model, batch, True, generator)
    return States(states.top + 0.3 * scale * torch.randn(states.top.shape, generator=generator),
                  states.hidden + 0.3 * scale * torch.randn(states.hidden.shape, generator=generator))


def random_images(model: PCViT, batch: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.channels, model.image_size, model.image_size, generator=generator)


def tiny_config_file(folder: pathlib.Path, **changes) -> list[str]:
    """`pcvit-train` arguments for the tiny config: ["--config", a YAML file of TINY + changes]."""
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return ["--config", str(path)]


# --- the runner ----------------------------------------------------------------------------------------
TINY_FIXED = {
    "dataset": "synthetic", "num_blocks": 1, "hidden_size": 8, "batch_size": 50, "train_subset": 100,
    "test_subset": 50, "validation_subset": 50, "epochs": 3, "inference_steps": 2, "eval_inference_steps": 2,
    "reconstruction_steps": 2,
    "validation_every_n_epochs": 3, "reconstruction_every_n_epochs": 3, "linear_probe_every_n_epochs": 1,
    "linear_probe_epochs": 2, "linear_probe_lr": 0.01, "linear_probe_batch_size": 50,
    "linear_probe_vode_indices": "0 1 2", "seed": 10, "device": "cpu",
}
TINY_SPACE = {
    "peak_lr_hidden": {"type": "float", "low": 0.05, "high": 0.11},
    "peak_lr_weights": {"type": "float", "low": 0.0005, "high": 0.003, "log": True},
    "hidden_momentum": {"type": "float", "low": 0.3, "high": 0.5},
}


def tiny_study(folder: pathlib.Path, name: str = "tiny", fixed: dict | None = None, space: dict | None = None,
               **top: Any) -> pathlib.Path:
    """Write a tiny study file into `folder`; keyword arguments override top-level keys."""
    space = space if space is not None else TINY_SPACE
    fixed = {k: v for k, v in {**TINY_FIXED, **(fixed or {})}.items() if k not in space}
    document = {
        "name": name, "direction": "maximize", "metric": "best_probe_accuracy", "sampler": {"type": "random"},
        "pruner": {"type": "none"}, "n_trials": 3, "max_retries": 2, "checkpoint_every_n_epochs": 1,
        "heartbeat_interval": 1, "grace_period": 4,
        "fixed": fixed, "space": space, **top,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def worker_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    env.pop("OPTUNA_STORAGE", None)
    return env


def start_worker(url: str, study_file: pathlib.Path, artifacts: pathlib.Path, log: pathlib.Path,
                 *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A real worker process: `python objective.py --storage URL --study-file FILE ...`, output to `log`."""
    command = [sys.executable, str(REPO / "objective.py"), "--storage", url, "--study-file", str(study_file),
               "--artifact-dir", str(artifacts), *extra]
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env or worker_env(), cwd=REPO)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def finish(process: subprocess.Popen, timeout: float, log: pathlib.Path) -> int:
    """Wait for a worker; on timeout kill it and fail with its log."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        raise AssertionError(f"worker did not finish in {timeout} s:\n{log.read_text()[-4000:]}") from None


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; none while no worker has created the study yet."""
    import storage

    try:
        return optuna.load_study(study_name=name, storage=storage.open_storage(url)).get_trials()
    except KeyError:
        return []


def run_workers_to_the_end(url: str, study_file: pathlib.Path, folder: pathlib.Path, workers: int,
                           trials_each: int) -> tuple[list[optuna.trial.FrozenTrial], list[optuna.trial.FrozenTrial]]:
    """Start `workers` worker processes on one study, wait until each exits 0; (all trials, trained trials)."""
    logs = [folder / f"w{i}.log" for i in range(workers)]
    procs = [start_worker(url, study_file, folder / "art", log, "--n-trials", str(trials_each)) for log in logs]
    for proc, log in zip(procs, logs):
        assert finish(proc, 300, log) == 0, log.read_text()[-3000:]
    done = trials(url, yaml.safe_load(study_file.read_text())["name"])
    return done, [t for t in done if not t.system_attrs.get("pcvit:surplus")]


def checkpoint_epoch(trial: optuna.trial.FrozenTrial) -> int:
    """The epoch of the trial's latest checkpoint, 0 without one."""
    return (record(trial).get("checkpoint") or {}).get("epoch", 0)


def running_trial_with_checkpoint(url: str, name: str, min_epoch: int = 1) -> optuna.trial.FrozenTrial | None:
    for t in trials(url, name):
        if t.state == optuna.trial.TrialState.RUNNING and checkpoint_epoch(t) >= min_epoch:
            return t
    return None
