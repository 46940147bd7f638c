"""What the per-node diagnostics cost: training batches with `node_diagnostics` on and off, interleaved.

    OMP_NUM_THREADS=1 python benchmarks/bench_diagnostics.py --blocks 12 --hidden 32 --batches 6

Two runs of the same config, differing only in `node_diagnostics`, take turns batch by batch (so a noisy machine
slows both alike); the epoch-end summary (one sync) is timed with the "on" run. Prints ms per batch and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from pcvit import Config
from pcvit.data import load_data
from pcvit.train import Run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--steps", type=int, default=20, help="inference steps per batch")
    p.add_argument("--batches", type=int, default=6)
    args = p.parse_args()
    base = Config(dataset=args.dataset, num_blocks=args.blocks, hidden_size=args.hidden, num_heads=2,
                  batch_size=args.batch_size, train_subset=args.batch_size * args.batches,
                  inference_steps=args.steps, device="cpu" if not torch.cuda.is_available() else "auto")
    data = load_data(base)
    runs = {flag: Run(base.replace(node_diagnostics=flag), data) for flag in (False, True)}
    times = {False: [], True: []}
    for b in range(args.batches):
        x = data.normalise(data.train_images[b * args.batch_size:(b + 1) * args.batch_size])
        for flag, run in runs.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            energy, mse = run.train_on_batch(x, last_of_epoch=b == args.batches - 1)  # as in an epoch
            energy.item()  # sync, so the batch is really done
            times[flag].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    runs[True].diagnostics.summary()
    summary_ms = 1e3 * (time.perf_counter() - t0)
    off, on = (1e3 * sum(times[f][1:]) / (args.batches - 1) for f in (False, True))  # the first batch warms up
    # an epoch's cost ratio: every batch adds cheap reductions, the last one also dE/dh
    print(f"{args.blocks} blocks, H {args.hidden}, B {args.batch_size}, T {args.steps}: "
          f"diagnostics off {off:.1f} ms/batch, on {on:.1f} ms/batch, ratio {on / off:.3f}; "
          f"epoch summary {summary_ms:.1f} ms")


if __name__ == "__main__":
    main()
