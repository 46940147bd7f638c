"""A short real training run per implementation and residual: does the fast path train like the reference?

    python benchmarks/train_check.py --device cuda --epochs 3 --out DIR

12 blocks on synthetic data (PyTorch only: no Optuna, W&B or database). For each residual option it trains the
`parallel` reference and `vjp` from the same seed, and prints one JSON line per epoch and one per run: train MSE,
energy, probe accuracy, epoch time with the probe's feature extraction counted in it, and the probe's share.
`vjp` goes through `Config(implementation="vjp")` when the config knows it, else through a patched
`pcvit.inference.state_grads` (as in bench_train.py).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pcvit.config as pcvit_config  # noqa: E402
import pcvit.inference as inference  # noqa: E402
from pcvit.config import Config  # noqa: E402
from pcvit.data import load_data  # noqa: E402
from pcvit.energy_vjp import energy_and_state_grads  # noqa: E402
from pcvit.listeners import Listener  # noqa: E402
from bench_train import emit  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from pcvit.train import train  # noqa: E402


class EpochPrinter(Listener):
    def __init__(self, tag: dict, out_file: Path | None):
        self.tag, self.out_file = tag, out_file

    def on_epoch(self, run, epoch, metrics):
        emit({**self.tag, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}, self.out_file)


@contextlib.contextmanager
def vjp_gradients(implementation: str):
    if implementation != "vjp" or "vjp" in pcvit_config.IMPLEMENTATIONS:
        yield
        return
    original = inference.state_grads
    inference.state_grads = lambda model, x, states: energy_and_state_grads(model, x, states.top, states.hidden)
    try:
        yield
    finally:
        inference.state_grads = original


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--impl", default="parallel,vjp")
    p.add_argument("--out", type=Path, default=None, help="folder for train.jsonl (nothing written without it)")
    args = p.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device
    out_file = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        out_file = args.out / "train.jsonl"
    for residual in ("double", "single"):
        for implementation in args.impl.split(","):
            base = "parallel" if implementation == "vjp" and "vjp" not in pcvit_config.IMPLEMENTATIONS \
                else implementation
            config = Config(dataset="synthetic", num_blocks=args.blocks, hidden_size=args.hidden,
                            num_heads=args.heads, batch_size=args.batch, inference_steps=args.steps,
                            train_subset=args.train_subset, test_subset=400, validation_subset=400,
                            epochs=args.epochs, residual=residual, implementation=base, device=device,
                            use_early_stopping=False, validation_every_n_epochs=args.epochs,
                            reconstruction_every_n_epochs=0, save_reconstruction_images=False,
                            intermediate_l1_coeff=1e-4, intermediate_l2_coeff=7e-5)
            tag = {"implementation": implementation, "residual": residual, "device": device}
            data = load_data(config)
            start = time.perf_counter()
            with vjp_gradients(implementation):
                result = train(config, data, listeners=[EpochPrinter(tag, out_file)])
            emit({**tag, "run": "end", "wall_s": round(time.perf_counter() - start, 2),
                  "final_train_mse": result.final_train_mse, "best_probe_accuracy": result.best_probe_accuracy,
                  "best_val_mse": result.best_val_mse, "stop_reason": result.stop_reason,
                  "epoch_time_s": [round(h["epoch_time_s"], 3) for h in result.history],
                  "probe_time_s": [round(h.get("probe_time_s", 0.0), 3) for h in result.history]}, out_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
