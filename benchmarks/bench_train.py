"""Time PC-ViT training batches for every implementation side by side; one JSON line per (implementation, config).

    python benchmarks/bench_train.py                       # CPU: small grid, eager, a few minutes on 2 cores
    python benchmarks/bench_train.py --device cuda --out bench-out/gpu   # the GPU grid + the largest config
    python benchmarks/bench_train.py --concurrent 4 --impl vjp --config 12/128/4/200/20   # 4 processes, 1 GPU

Each implementation trains the same `--batches` synthetic batches from the same seed with `pcvit.train.Run`
(settle T steps, one AdamW step, reconstruct), timed per batch with a device sync on both sides. A line holds:
median and min ms per batch over the batches after `--warmup`, the first batch apart (it pays compilation),
process CPU ms per batch, image-steps/s (B*T / median), achieved TFLOP/s (`flops_per_batch`, matrix products
only), peak memory, and the max |difference| of the final states and weights from `plain` (eager, same
precision) after the same batches. On CUDA the implementations run one after the other, so that each has its
own peak memory; on a CPU they take turns batch by batch (`--interleave`), so that the load of a shared machine
falls on all of them alike.

Implementations: `plain`, `parallel` (autograd on model.py's two forwards) and `vjp` (pcvit.energy_vjp's hand-written
state gradients, stepped in place). `NAME+compile` runs NAME under torch.compile (for vjp the whole in-place
state step, patched into `pcvit.train.settle_states` for that run only; model.energy for the weight step); on
CUDA every implementation also runs compiled by default (`--no-compile` turns that off). Nothing is written
outside `--out` (the inductor cache goes there too).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pcvit.config as pcvit_config  # noqa: E402
from pcvit.config import Config, resolve_precision  # noqa: E402
from pcvit.data import load_data  # noqa: E402
from pcvit.energy_vjp import resolve_attention, settle_states_inplace, state_step_  # noqa: E402
from pcvit.train import Run, matmul_precision  # noqa: E402

train_module = importlib.import_module("pcvit.train")  # `pcvit.train` the attribute is the train() function

IMPLEMENTATIONS = pcvit_config.IMPLEMENTATIONS
GRIDS = {  # blocks / hidden / heads / batch / inference steps
    "small": ["2/32/2/32/5", "4/64/4/32/5"],
    "gpu": ["12/64/1/200/20", "12/128/4/200/20", "6/64/1/200/20", "12/128/4/256/40"],  # speed goal + the largest
}


def flops_per_batch(L: int, H: int, M: int, N: int, P: int, B: int, T: int) -> dict[str, float]:
    """Matrix-product FLOPs of one training batch (2 per multiply-add); elementwise work is not counted.

    Per token and block, F = forward, V = state VJP (inputs only), W = weight gradients:
        F = 2*(3H*H + H*H + 2*H*M) + 2*2*N*H      qkv, out-proj, MLP; scores q.k and weighted sum of v
        V = 2*(3H*H + H*H + 2*H*M) + 4*2*N*H      the same products transposed; dP, dV, dQ, dK
        W = 2*(3H*H + H*H + 2*H*M)                 attention scores carry no weights
    plus per token 2*P*H for the patch projection and 2*H*P for the output projection (each in F, V and W).
    One inference step = F + V; the weight step = F + V + W (autograd also pulls the errors back through the
    blocks); the reconstruction after it = F (the top-down chain). batch = T*step + weight step + reconstruction.
    An estimate of "about 4 TFLOP" for 12/128/4 counts every backward as twice the forward; this count gives 3.0.
    """
    linear = 2 * (4 * H * H + 2 * H * M)
    fwd = L * (linear + 4 * N * H) + 4 * P * H
    vjp = L * (linear + 8 * N * H) + 4 * P * H
    wgrad = L * linear + 4 * P * H
    tokens = B * N
    step, weight, recon = tokens * (fwd + vjp), tokens * (fwd + vjp + wgrad), tokens * fwd
    return {"inference_step": step, "weight_step": weight, "reconstruction": recon,
            "batch": T * step + weight + recon}


def parse_config(text: str) -> tuple[int, int, int, int, int]:
    parts = [int(p) for p in text.split("/")]
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(f"{text!r}: expected blocks/hidden/heads/batch/steps, e.g. 12/128/4/200/20")
    return tuple(parts)  # type: ignore[return-value]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def patched(patches: list[tuple[object, str, object]]):
    """Set module.name = value for the duration (settle_states and Run.settle look these up at call time)."""
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in reversed(originals):
            setattr(module, name, value)


class Trial:
    """One implementation training the benchmark's batches: a fresh Run (same seed, same data), the module
    patches it needs, and its timings."""

    def __init__(self, name: str, shape, precision: str, device: torch.device, batches: int,
                 compile_mode: str | None):
        self.name, self.shape, self.device = name, shape, device
        self.precision = resolve_precision(precision, device.type)  # recorded as run: auto is tf32 on CUDA
        impl, compiled = name.split("+")[0], name.endswith("+compile")
        L, H, heads, B, T = shape
        config = Config(dataset="synthetic", num_blocks=L, hidden_size=H, num_heads=heads, batch_size=B,
                        inference_steps=T, train_subset=B * batches, test_subset=B, validation_subset=B,
                        epochs=10, implementation=impl, precision=precision, device=str(device),
                        linear_probe_every_n_epochs=0)
        data = load_data(config, device)
        self.run = Run(config, data)
        compile_fn = (lambda fn: torch.compile(fn, mode=compile_mode, dynamic=False)) if compiled else (lambda fn: fn)
        self.patches = []
        if impl == "vjp" and compiled:  # the same in-place steps as inference.settle_states, compiled
            step, original = compile_fn(state_step_), train_module.settle_states

            def settle(model, x, states, steps, lr_at, momentum, clip_norm, scales, grad_norm_target=None, **hooks):
                if any(hook is not None for hook in hooks.values()):
                    return original(model, x, states, steps, lr_at, momentum, clip_norm, scales,
                                    grad_norm_target=grad_norm_target, **hooks)
                return settle_states_inplace(model, x, states, steps, lr_at, momentum, clip_norm, scales, step=step,
                                             grad_norm_target=grad_norm_target)
            self.patches.append((train_module, "settle_states", settle))
        if compiled:  # the autograd path (and every weight step) goes through a compiled energy
            self.run.model.energy = torch.compile(self.run.model.energy, mode=compile_mode, dynamic=False)
        self.xs = [data.normalise(data.train_images[b * B:(b + 1) * B]) for b in range(batches)]
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def train_batch(self, b: int) -> None:
        with patched(self.patches), matmul_precision(self.precision):
            sync(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            self.run.train_on_batch(self.xs[b])
            sync(self.device)
            self.times.append(time.perf_counter() - t0)
            self.cpu_times.append(time.process_time() - c0)

    def final(self) -> dict:
        return {"top": self.run.states.top.detach(), "hidden": self.run.states.hidden.detach(),
                "weights": {k: v.detach() for k, v in self.run.model.state_dict().items()}}

    def record(self, warmup: int, peak: float | None, peak_kind: str, reference: dict | None) -> dict:
        L, H, heads, B, T = self.shape
        timed = self.times[warmup:] or self.times
        median = statistics.median(timed)
        m = self.run.model
        flops = flops_per_batch(L, H, m.config.mlp_hidden, m.num_patches, m.patch_dim, B, T)
        final = self.final()
        rec = {
            "implementation": self.name, "precision": self.precision,
            "blocks": L, "hidden": H, "heads": heads, "batch": B, "steps": T,
            "batches": len(self.times), "timed_batches": len(timed),
            "ms_per_batch": round(median * 1e3, 3), "ms_per_batch_min": round(min(timed) * 1e3, 3),
            "first_batch_ms": round(self.times[0] * 1e3, 3),
            "cpu_ms_per_batch": round(statistics.median(self.cpu_times[warmup:] or self.cpu_times) * 1e3, 3),
            "compile_s": round(self.times[0] - median, 3) if self.name.endswith("+compile") else None,
            "image_steps_per_s": round(B * T / median, 1),
            "tflop_per_batch": round(flops["batch"] / 1e12, 5),
            "tflops": round(flops["batch"] / median / 1e12, 4),
            "peak_mem_mb": None if peak is None else round(peak, 1), "peak_mem_kind": peak_kind,
            "max_abs_diff_states": None, "max_abs_diff_weights": None,
            "max_abs_state": max(final[k].abs().max().item() for k in ("top", "hidden")),
        }
        if self.name.startswith("vjp"):
            rec["attention"] = resolve_attention("auto", self.device, heads, H // heads, self.precision)
        if reference is not None:
            rec["max_abs_diff_states"] = max((final[k].float() - reference[k].float()).abs().max().item()
                                             for k in ("top", "hidden"))
            rec["max_abs_diff_weights"] = max((v.float() - reference["weights"][k].float()).abs().max().item()
                                              for k, v in final["weights"].items())
        return rec


def measure_sequential(names, shape, precision, device, batches, warmup, compile_mode, barrier=None):
    """One implementation after the other, each alone in memory: peak memory is its own. Yields records."""
    reference = None
    for name in names:
        try:
            if name.endswith("+compile"):
                torch._dynamo.reset()  # a fresh model per run: do not pile up guards against the recompile limit
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            trial = Trial(name, shape, precision, device, batches, compile_mode)
            for b in range(batches):
                if barrier is not None and b == warmup:
                    barrier()
                trial.train_batch(b)
            if device.type == "cuda":
                peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
            else:  # process-wide peak RSS growth: a lower bound once an earlier run has raised the peak
                peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
                kind = "cpu_peak_rss_growth"
            yield trial.record(warmup, peak, kind, reference)
            if name == "plain":
                reference = trial.final()
            del trial
        except Exception as exc:  # one failing implementation must not hide the others' numbers
            yield error_record(name, shape, precision, exc)


def measure_interleaved(names, shape, precision, device, batches, warmup, compile_mode):
    """All implementations alive at once, one batch each in turn: load changes on a shared machine hit every
    implementation alike (the CPU default). Peak memory is not separable here and is reported as null."""
    torch._dynamo.reset()
    trials, records = {}, {}
    for name in names:
        try:
            trials[name] = Trial(name, shape, precision, device, batches, compile_mode)
        except Exception as exc:
            records[name] = error_record(name, shape, precision, exc)
    for b in range(batches):
        for name in list(trials):
            try:
                trials[name].train_batch(b)
            except Exception as exc:
                records[name] = error_record(name, shape, precision, exc)
                del trials[name]
    reference = trials["plain"].final() if "plain" in trials else None
    for name in names:
        yield records[name] if name in records else \
            trials[name].record(warmup, None, "n/a (interleaved)", None if name == "plain" else reference)


def error_record(name, shape, precision, exc) -> dict:
    L, H, heads, B, T = shape
    return {"implementation": name, "precision": precision, "blocks": L, "hidden": H, "heads": heads, "batch": B,
            "steps": T, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["tf32_matmul_default"] = torch.backends.cuda.matmul.allow_tf32
    return env


def emit(record: dict, out_file: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out_file is not None:
        with open(out_file, "a") as f:
            f.write(line + "\n")


def run_grid(args, device: torch.device, out_file: Path | None) -> int:
    env = environment(device)
    failures = 0
    for shape in args.config:
        for precision in args.precision:
            measure = measure_interleaved if args.interleave else measure_sequential
            for record in measure(args.impl, shape, precision, device, args.batches, args.warmup,
                                  args.compile_mode):
                failures += "error" in record
                emit({**record, **env}, out_file)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failures else 0


def run_concurrent(args, device: torch.device, out_dir: Path | None, out_file: Path | None) -> int:
    """N processes train the first config/implementation at once; timing starts when all have warmed up."""
    n = args.concurrent
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        barrier_dir = Path(scratch)
        shape = "/".join(str(v) for v in args.config[0])
        cmd = [sys.executable, __file__, "--device", str(device), "--impl", args.impl[0], "--config", shape,
               "--precision", args.precision[0], "--batches", str(args.batches), "--warmup", str(args.warmup),
               "--barrier", f"{barrier_dir}:{n}"]
        if args.compile_mode:
            cmd += ["--compile-mode", args.compile_mode]
        procs = [subprocess.Popen(cmd + ["--worker", str(i)], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(barrier_dir / f"inductor{i}")})
                 for i in range(n)]
        records = []
        for proc in procs:
            stdout, _ = proc.communicate()
            lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
            records.extend(lines)
    ok = [r for r in records if "error" not in r]
    for r in records:
        emit({**r, "concurrent": n}, out_file)
    summary = {"concurrent": n, "implementation": args.impl[0], "config": shape, "precision": args.precision[0],
               "processes_ok": len(ok),
               "aggregate_image_steps_per_s": round(sum(r["image_steps_per_s"] for r in ok), 1),
               "aggregate_tflops": round(sum(r["tflops"] for r in ok), 4),
               "mean_ms_per_batch": round(statistics.mean(r["ms_per_batch"] for r in ok), 3) if ok else None,
               **environment(device)}
    emit(summary, out_file)
    return 0 if len(ok) == n else 1


def file_barrier(spec: str, worker: int):
    """Wait until every worker has written its ready file (all processes time the same period)."""
    folder, count = spec.rsplit(":", 1)

    def wait() -> None:
        Path(folder, f"ready.{worker}").touch()
        deadline = time.monotonic() + 600
        while len(list(Path(folder).glob("ready.*"))) < int(count) and time.monotonic() < deadline:
            time.sleep(0.02)
    return wait


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--grid", choices=sorted(GRIDS), help="default: gpu on CUDA, small elsewhere")
    p.add_argument("--config", type=parse_config, action="append",
                   help="blocks/hidden/heads/batch/steps, repeatable; replaces the grid")
    p.add_argument("--impl", default=None, help="comma list of plain, parallel, vjp and NAME+compile "
                                                "(default: all four; plain is the reference for the diffs)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also run every implementation compiled (default on CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--batches", type=int, default=None, help="batches per implementation (default 8 CPU, 15 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first batches (default 2 CPU, 5 CUDA)")
    p.add_argument("--precision", default="auto", help="comma list of auto, float32, tf32, bf16 (default auto: tf32 "
                                                       "on CUDA, what the original ran and its timings are of)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--interleave", dest="interleave", action="store_true", default=None,
                   help="one batch of each implementation in turn (default on CPU; no per-implementation memory)")
    p.add_argument("--sequential", dest="interleave", action="store_false",
                   help="one implementation after the other (default on CUDA; peak memory per implementation)")
    p.add_argument("--out", type=Path, default=None, help="folder for results.jsonl (nothing written without it)")
    p.add_argument("--concurrent", type=int, default=0, help="run N processes at once on the first config/impl")
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.config = args.config or [parse_config(s) for s in GRIDS[args.grid or ("gpu" if cuda else "small")]]
    args.impl = (args.impl or ",".join(IMPLEMENTATIONS)).split(",")
    if args.compile if args.compile is not None else cuda:
        args.impl += [f"{i}+compile" for i in args.impl if not i.endswith("+compile")]
    args.precision = args.precision.split(",")
    for name in args.impl:
        if name.split("+")[0] not in IMPLEMENTATIONS:
            p.error(f"--impl: unknown implementation {name!r}")
    for prec in args.precision:
        if prec not in pcvit_config.PRECISIONS:
            p.error(f"--precision: unknown precision {prec!r}")
    args.interleave = (not cuda) if args.interleave is None else args.interleave
    args.batches = args.batches or (15 if cuda else 8)
    args.warmup = min(args.warmup if args.warmup is not None else (5 if cuda else 2), args.batches - 1)

    out_file = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        out_file = args.out / "results.jsonl"
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.out.resolve() / "inductor-cache"))
    if args.barrier:  # a worker of --concurrent: one measurement, timed after the shared barrier
        barrier = file_barrier(args.barrier, args.worker)
        record = next(measure_sequential(args.impl[:1], args.config[0], args.precision[0], device, args.batches,
                                         args.warmup, args.compile_mode, barrier=barrier))
        print(json.dumps({**record, "worker": args.worker, **environment(device)}), flush=True)
        return 0 if "error" not in record else 1
    if args.concurrent:
        return run_concurrent(args, device, args.out, out_file)
    return run_grid(args, device, out_file)


if __name__ == "__main__":
    sys.exit(main())
