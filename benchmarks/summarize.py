"""Markdown tables from bench_train.py's results.jsonl: speed-up against `plain`, memory, concurrency.

    python benchmarks/summarize.py bench-out/gpu/results.jsonl [--card-gib 80]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e6):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--card-gib", type=float, default=80.0, help="GPU memory for the trials-per-card estimate")
    args = p.parse_args(argv)
    records = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.startswith("{")]
    grid = [r for r in records if "concurrent" not in r and "worker" not in r]
    plain = {(r["blocks"], r["hidden"], r["heads"], r["batch"], r["steps"], r["precision"]): r["ms_per_batch"]
             for r in grid if r.get("implementation") == "plain" and "ms_per_batch" in r}
    print("| blocks/hidden/heads | B | T | precision | implementation | ms/batch (median) | min | speed-up vs plain "
          "| image-steps/s | TFLOP/s | peak MiB | compile s | max abs diff states / weights "
          "| states diff / max state |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in grid:
        key = (r["blocks"], r["hidden"], r["heads"], r["batch"], r["steps"], r["precision"])
        head = f"| {r['blocks']}/{r['hidden']}/{r['heads']} | {r['batch']} | {r['steps']} | {r['precision']} " \
               f"| {r['implementation']} "
        if "error" in r:
            print(head + f"| error: {r['error'][:80]} |" + " |" * 8)
            continue
        ratio = plain[key] / r["ms_per_batch"] if key in plain else None
        diffs = f"{fmt(r.get('max_abs_diff_states'))} / {fmt(r.get('max_abs_diff_weights'))}"
        rel = r["max_abs_diff_states"] / r["max_abs_state"] if r.get("max_abs_diff_states") is not None \
            and r.get("max_abs_state") else None
        print(head + f"| {fmt(r['ms_per_batch'])} | {fmt(r['ms_per_batch_min'])} | "
              f"{fmt(ratio, 2) + 'x' if ratio else '-'} | {fmt(r['image_steps_per_s'], 0)} | {fmt(r['tflops'], 3)} | "
              f"{fmt(r['peak_mem_mb'], 0)} | {fmt(r.get('compile_s'))} | {diffs} | {fmt(rel)} |")
    largest = [r for r in grid if "error" not in r and r.get("peak_mem_kind") == "cuda_max_allocated"]
    if largest:
        top = max(largest, key=lambda r: (r["blocks"] * r["hidden"] * r["batch"] * r["steps"]))
        shape = (top["blocks"], top["hidden"], top["heads"], top["batch"], top["steps"])
        print(f"\nPeak GPU memory at {shape[0]}/{shape[1]}/{shape[2]}, B={shape[3]}, T={shape[4]} and trials per "
              f"{args.card_gib:g} GiB card (peak + 0.5 GiB CUDA context each):")
        for r in largest:
            if (r["blocks"], r["hidden"], r["heads"], r["batch"], r["steps"]) == shape:
                gib = r["peak_mem_mb"] / 1024
                print(f"- {r['implementation']} ({r['precision']}): {gib:.2f} GiB -> "
                      f"{math.floor(args.card_gib / (gib + 0.5))} trials")
    summaries = [r for r in records if "aggregate_image_steps_per_s" in r]
    if summaries:
        print("\n| processes | implementation | config | ok | aggregate image-steps/s | aggregate TFLOP/s "
              "| mean ms/batch per process |")
        print("|---|---|---|---|---|---|---|")
        for r in summaries:
            print(f"| {r['concurrent']} | {r['implementation']} | {r['config']} | {r['processes_ok']} | "
                  f"{fmt(r['aggregate_image_steps_per_s'], 0)} | {fmt(r['aggregate_tflops'], 3)} | "
                  f"{fmt(r['mean_ms_per_batch'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
