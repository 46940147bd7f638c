"""Ablation of the depth options on Fashion-MNIST: one pcvit-train run per row, a markdown table at the end.

    python benchmarks/depth_ablation.py --blocks 12 --train-subset 2000 --epochs 3 --jobs 2 --out runs/ablation-12

Every row is the same command (the shared settings below, converged L-BFGS probe on vode 0 averaged over patches,
probed after the last epoch) plus the row's `--set` options, each with its controls (`--baseline`: the same
network untrained, a PCA of the pixels to the probed size, raw patches; the same probe on the same images). Runs
go in parallel, one thread each. The table gives probe accuracy beside the controls, final train MSE, validation
MSE, whether the run diverged, and wall time. The feature levers (epc, precision, t_per_block, augment) are rows
too: `--rows best,best+epc,best+precision,best+t_per_block,best+augment`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROWS = {
    "defaults": [],
    "status_init": ["use_status_init_in_training=true", "use_status_init_in_unmasking=true"],
    "single": ["residual=single"],
    "branch_1/L": ["residual_branch_scale=1/L"],
    "branch_1/sqrt(L)": ["residual_branch_scale=1/sqrt(L)"],
    "energy_mean": ["energy_weighting=mean"],
    "no_noise": ["use_noise=false"],
    "probe_T100": ["linear_probe_inference_steps=100"],
    "vgn10": ["use_vode_grad_norm=true", "vode_grad_norm_target=10"],
    "vgn50": ["use_vode_grad_norm=true", "vode_grad_norm_target=50"],
    "epc": ["inference_variables=errors"],
    "precision": ["node_precision=dynamic"],
    "t_per_block": ["inference_steps_per_block=2"],
    "augment": ["use_ssl_augmentations=true"],
    "best": ["use_status_init_in_training=true", "use_status_init_in_unmasking=true", "residual=single",
             "residual_branch_scale=1/L", "use_noise=false"],
}


def shared_settings(args: argparse.Namespace) -> list[str]:
    heads = 1 if args.blocks <= 2 else 2
    return ["--dataset", "fashion-mnist", "--num-blocks", str(args.blocks), "--hidden-size", str(args.hidden),
            "--num-heads", str(heads), "--train-subset", str(args.train_subset), "--epochs", str(args.epochs),
            "--inference-steps", str(args.inference_steps), "--no-progress",
            "--set", f"test_subset={args.test_subset}", "--set", f"validation_subset={args.test_subset}",
            "--set", "validation_every_n_epochs=0",
            "--set", "reconstruction_every_n_epochs=0", "--set", "save_reconstruction_images=false",
            "--set", f"linear_probe_every_n_epochs={args.epochs}", "--set", "linear_probe_solver=lbfgs",
            "--set", "use_early_stopping=false"]


def run_row(name: str, options: list[str], args: argparse.Namespace) -> dict:
    out = args.out / re.sub(r"[^A-Za-z0-9_-]+", "_", name)
    command = [sys.executable, "-m", "pcvit.cli", *shared_settings(args), "--out", str(out),
               "--summary-json", str(out / "summary.json")]
    for option in options:
        command += ["--set", option]
    command.append("--baseline")  # the controls of every row: a lever changes the untrained network's inference too
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - started
    if code != 0:
        return {"row": name, "error": f"exit {code}, see {out / 'log.txt'}", "wall_s": wall}
    summary = json.loads((out / "summary.json").read_text())
    last = summary["history"][-1] if summary["history"] else {}
    return {"row": name, "options": " ".join(options) or "(none)", "probe": summary["best_probe_accuracy"],
            "baseline": summary.get("raw_patch_baseline"), "untrained": summary.get("untrained_baseline"),
            "pca": summary.get("pca_baseline"), "pca_k": summary.get("pca_components"),
            "train_mse": summary["final_train_mse"],
            "val_mse": last.get("val_mse"), "diverged": summary["diverged"], "wall_s": wall,
            "top_move_rms": last.get("top_move_rms"), "state_rms_top_block": (last.get("state_rms") or [None])[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--test-subset", type=int, default=1000, help="probe test images (and validation images)")
    p.add_argument("--inference-steps", type=int, default=20)
    p.add_argument("--rows", default=",".join(ROWS),
                   help="comma-separated row names; a row may add names with '+' (status_init+single) and leave "
                        "one out with '-' (best-single)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = p.parse_args(argv)
    rows = []
    for name in args.rows.split(","):
        options: list[str] = []
        for sign, part in re.findall(r"([+-]?)([^+-]+)", name):
            if part not in ROWS:
                p.error(f"--rows: unknown row {part!r} (known: {', '.join(ROWS)})")
            if sign == "-":  # leave that option out again: "best-single" is best with the double residual
                options = [o for o in options if o not in ROWS[part]]
            else:
                options += ROWS[part]
        rows.append((name, options))
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda item: run_row(item[0], item[1], args), rows))
    print(f"\n{args.blocks} blocks, H {args.hidden}, {args.train_subset} images, {args.test_subset} test images, "
          f"{args.epochs} epochs, T {args.inference_steps}")
    print("| row | probe | untrained | PCA | raw patches | train MSE | val MSE | diverged | top-latent move | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['row']} | {r['error']} | | | | | | | | {r['wall_s']:.0f} |")
            continue
        fmt = lambda v, f: "-" if v is None or isinstance(v, str) else format(v, f)  # noqa: E731
        print(f"| {r['row']} | {fmt(r['probe'], '.3f')} | {fmt(r['untrained'], '.3f')} | "
              f"{fmt(r['pca'], '.3f')} (k={r['pca_k']}) | {fmt(r['baseline'], '.3f')} | {fmt(r['train_mse'], '.4f')} "
              f"| {fmt(r['val_mse'], '.4f')} | {r['diverged']} | {fmt(r['top_move_rms'], '.3g')} | {r['wall_s']:.0f} |")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
