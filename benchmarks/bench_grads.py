"""Time one state gradient (energy and dE/dh at fixed states) per implementation: the inner loop of inference.

    python benchmarks/bench_grads.py                                   # CPU, a few shapes, one thread
    python benchmarks/bench_grads.py --device cuda --shape 12/128/4/200 --shape 12/64/1/200 --out DIR

Autograd through `plain` and `parallel` (pcvit.inference.state_grads) against pcvit.energy_vjp's hand-written VJP with
explicit (`vjp-math`) and fused (`vjp-fused`) attention; `--compile` adds compiled variants. On a CPU the time is
the thread's CPU time (robust on a shared machine) with one thread unless --threads says otherwise; on CUDA it
is wall time with a sync. Min and median of --repeat calls after two warm-up calls; one JSON line per
(shape, implementation), also appended to DIR/grads.jsonl with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcvit.config import Config, resolve_precision  # noqa: E402
from pcvit.energy_vjp import energy_and_state_grads  # noqa: E402
from pcvit.inference import States, state_grads  # noqa: E402
from pcvit.model import PCViT  # noqa: E402


def timer(device: torch.device):
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.thread_time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", action="append", help="blocks/hidden/heads/batch (repeatable)")
    p.add_argument("--precision", default="auto", help="auto (tf32 on CUDA, as the original), float32, tf32, bf16")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device.type)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    now = timer(device)
    shapes = args.shape or ["2/32/2/32", "4/64/4/32", "12/64/1/32", "12/128/4/32"]
    for shape in shapes:
        L, H, heads, B = (int(v) for v in shape.split("/"))
        config = Config(dataset="synthetic", num_blocks=L, hidden_size=H, num_heads=heads, device=str(device),
                        intermediate_l1_coeff=1e-4, intermediate_l2_coeff=1e-4, precision=args.precision)
        model = PCViT(config, 3, 32, torch.Generator().manual_seed(0)).to(device)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(B, 3, 32, 32, generator=gen).to(device)
        top = torch.randn(B, model.num_patches, model.patch_dim, generator=gen).to(device)
        hidden = torch.randn(L + 1, B, model.num_patches, H, generator=gen).to(device)

        autograd = lambda: state_grads(model, x, States(top, hidden))  # noqa: E731
        candidates = {  # name: (model.config.implementation, call)
            "plain": ("plain", autograd), "parallel": ("parallel", autograd),
            "vjp-math": ("parallel", lambda: energy_and_state_grads(model, x, top, hidden, attention="math")),
            "vjp-fused": ("parallel", lambda: energy_and_state_grads(model, x, top, hidden, attention="fused")),
        }
        if args.compile:
            compiled_vjp = torch.compile(energy_and_state_grads, dynamic=False)
            candidates["vjp-fused+compile"] = (
                "parallel", lambda: compiled_vjp(model, x, top, hidden, attention="fused"))
        for name, (implementation, fn) in candidates.items():
            model.config = config.replace(implementation=implementation)
            try:
                fn(), fn()
                times = []
                for _ in range(args.repeat):
                    t0 = now()
                    fn()
                    times.append(now() - t0)
                record = {"shape": shape, "implementation": name, "precision": args.precision,
                          "ms_min": round(min(times) * 1e3, 3), "ms_median": round(statistics.median(times) * 1e3, 3)}
            except Exception as exc:  # e.g. no fused kernel for this shape on this device
                record = {"shape": shape, "implementation": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
            record.update(device=str(device), torch=torch.__version__,
                          clock="thread_cpu" if device.type == "cpu" else "wall_sync",
                          threads=torch.get_num_threads() if device.type == "cpu" else None)
            line = json.dumps(record)
            print(line, flush=True)
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                with open(args.out / "grads.jsonl", "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
