"""What `use_ssl_augmentations` costs per batch: the augmentation alone, and one training batch with and without it.

    python benchmarks/bench_augment.py                                  # CPU, one thread
    python benchmarks/bench_augment.py --device cuda --out bench-out/gpu

For CIFAR-10-shaped (3x32x32) and Fashion-MNIST-shaped (1x28x28) batches of `--batch` normalised images:
median ms of `pcvit.augment.augment` (draws + crop, flip, colour jitter, grey, blur, on the device, one sync per
call), and median ms of `Run.train_on_batch` for the `--config` model (blocks/hidden/heads/T), so the cost reads
against the work it rides on. One JSON line per shape, also written to OUT/augment.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pcvit.augment import augment  # noqa: E402
from pcvit.config import Config  # noqa: E402
from pcvit.data import load_data  # noqa: E402
from pcvit.train import Run  # noqa: E402

SHAPES = {"cifar10": "synthetic", "fashion-mnist": "fashion-mnist"}  # shape -> dataset with that shape (offline)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median ms of `fn()` over `repeats` calls after two warm-up calls, synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--config", default="12/64/1/20", help="blocks/hidden/heads/T of the training batch")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--train-repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-out/augment"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    blocks, hidden, heads, steps = (int(v) for v in args.config.split("/"))
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for shape, dataset in SHAPES.items():
        config = Config(dataset=dataset, num_blocks=blocks, hidden_size=hidden, num_heads=heads,
                        inference_steps=steps, batch_size=args.batch, train_subset=args.batch * 2,
                        test_subset=args.batch, validation_subset=args.batch, device=args.device,
                        node_diagnostics=False)
        run = Run(config, load_data(config))
        x = run.data.normalise(run.data.train_images[:args.batch])
        generator = torch.Generator(device=device).manual_seed(0)
        augment_ms = timed(lambda: augment(x, generator), args.repeats, device)
        train_ms = timed(lambda: run.train_on_batch(x), args.train_repeats, device)
        line = {"shape": shape, "images": list(x.shape), "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "augment_ms_per_batch": round(augment_ms, 3), "train_batch_ms": round(train_ms, 1),
                "config": args.config, "augment_share": round(augment_ms / (augment_ms + train_ms), 4)}
        print(json.dumps(line), flush=True)
        lines.append(line)
    (args.out / "augment.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
