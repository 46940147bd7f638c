"""`pcvit-train`: one PC-ViT training run from a YAML config and `--set KEY=VALUE` overrides.

    pcvit-train --config run.yaml --set num_blocks=4 --set hidden_size=64 --summary-json out/summary.json

Prints one row per epoch, shows a progress bar per epoch, saves reconstruction grids and metrics.jsonl
in --out, and always writes the summary (also after Ctrl-C or divergence). Exit code 0 for any finished
run (diverged and early-stopped included), 2 for bad input, 130 after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import Config, ConfigError, coerce, field_names, resolve_precision
from .data import DatasetError, load_data, resolve_device
from .diagnostics import format_table
from .listeners import Listener, RunResult, StopReason
from .controls import NodeProbe, feature_linearity, probe_controls, probe_each_node
from .train import Run

SUGAR = ("num_blocks", "hidden_size", "num_heads", "dataset", "epochs", "batch_size", "train_subset",
         "inference_steps", "implementation", "residual", "device", "seed")


class ConsoleListener(Listener):
    """A progress bar per epoch and one fixed-width row per epoch on stderr/stdout."""

    wants_batches = True
    COLUMNS = ("epoch", "train_mse", "energy", "val_mse", "probe_acc", "lr_w", "lr_h_max", "time_s")

    def __init__(self, stream=None, progress: bool = True, diagnostics: bool = False):
        self._stream, self.progress, self.bar = stream, progress, None
        self.diagnostics = diagnostics  # also print the per-node table under each row
        self.warned_probe = False

    @property
    def stream(self):
        return self._stream or sys.stdout  # looked up late, so redirected stdout (tests, notebooks) is honoured

    def on_start(self, run: Run) -> None:
        print(" ".join(f"{c:>10}" for c in self.COLUMNS), file=self.stream, flush=True)

    def on_batch(self, run: Run, epoch: int, batch: int, metrics: dict[str, Any]) -> None:
        if not self.progress:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=run.batches_per_epoch, desc=f"epoch {epoch}", leave=False, file=sys.stderr)
        self.bar.update(1)

    def on_epoch(self, run: Run, epoch: int, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        values = (epoch, metrics["train_mse"], metrics["train_energy"], metrics.get("val_mse", float("nan")),
                  metrics.get("probe_accuracy", float("nan")), metrics["lr_weights"], metrics["lr_hidden_max_used"],
                  metrics["epoch_time_s"])
        row = [f"{values[0]:>10d}"] + [f"{v:>10.4g}" for v in values[1:]]
        print(" ".join(row), file=self.stream, flush=True)
        if metrics.get("probe_converged") is False and not self.warned_probe:
            self.warned_probe = True
            change = run.config.linear_probe_converged_change
            print(f"warning: the probe's head was still learning after {metrics['probe_steps']} steps (over the "
                  f"last tenth its loss moved by more than {change:g} of where it started): its accuracy understates "
                  "the features. Raise linear_probe_epochs or set linear_probe_solver=lbfgs.", file=self.stream,
                  flush=True)
        if self.diagnostics and "node_energy" in metrics:
            print(format_table(metrics, run.config.num_blocks), file=self.stream, flush=True)

    def on_end(self, run: Run, result: RunResult) -> None:
        print(f"stopped: {result.stop_reason} {result.stop_detail}".rstrip() +
              f" | best probe {result.best_probe_accuracy:.4f} | best train mse {result.best_train_mse:.5g}"
              f" | {result.wall_time_s:.1f}s on {result.device}", file=self.stream, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcvit-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML file of config fields (keys = field names)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field; repeatable")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="folder for images and metrics.jsonl")
    p.add_argument("--summary-json", type=Path, help="write the final summary here (default: OUT/summary.json)")
    p.add_argument("--baseline", action="store_true",
                   help="also probe the controls, the same probe on the same images: raw patches, the same network "
                        "untrained, and a PCA of the pixels to the probed feature dimension (pcvit.controls)")
    p.add_argument("--probe-each-node", action="store_true",
                   help="after training, probe every node alone beside the same node untrained and a PCA of the "
                        "pixels to its width: where the features are (costs two probes' inference)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--diagnostics", action="store_true",
                   help="print per-node energy, state RMS, |dE/dh| and top-latent movement under each epoch's row")
    p.add_argument("--list-fields", action="store_true", help="print every config field with its default and exit")
    for name in SUGAR:
        p.add_argument("--" + name.replace("_", "-"), dest="sugar_" + name, metavar="VALUE",
                       help=f"same as --set {name}=VALUE")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """YAML file, then sugar flags, then --set: later wins. Names the bad key."""
    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            loaded = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError("--config", f"cannot read {args.config}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("--config", f"{args.config} must hold a mapping of config fields")
        values.update(loaded)
    for name in SUGAR:
        if getattr(args, "sugar_" + name) is not None:
            values[name] = getattr(args, "sugar_" + name)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
        values[key.strip()] = yaml.safe_load(value) if value.strip() else value
    return Config.from_dict({k: coerce(k, v) if k in field_names() else v for k, v in values.items()})


def _interrupt_handler(run: Run):
    """First Ctrl-C/SIGTERM: stop after the current batch and write the summary; a second one: stop now.

    Installed explicitly, because a process started in the background inherits SIGINT ignored."""
    def handle(signum, frame):
        if run.interrupted:
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name}: stopping after this batch (again to stop at once)",
              file=sys.stderr, flush=True)
        run.interrupt(signal.Signals(signum).name)
    return handle


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_fields:
        for name, value in Config().to_dict().items():
            print(f"{name} = {value!r}")
        return 0
    try:
        config = resolve_config(args)
        data = load_data(config)
    except (ConfigError, DatasetError) as exc:
        print(f"pcvit-train: error: {exc}", file=sys.stderr)
        return 2
    device = resolve_device(config.device)
    print(f"device {device} | {config.dataset} {len(data.train_images)} train images | "
          f"{config.num_blocks} blocks, hidden {config.hidden_size}, {config.num_heads} heads, "
           f"{config.implementation}, {resolve_precision(config.precision, device.type)} matmuls | "
           f"torch {torch.__version__}", flush=True)
    controls = None
    if args.baseline:
        controls = probe_controls(data, config)
        print(f"controls ({controls.time_s:.0f} s): {controls.describe()}", flush=True)
    started = time.time()
    console = ConsoleListener(progress=not args.no_progress, diagnostics=args.diagnostics)
    run = Run(config, data, [console], out_dir=args.out)
    previous = {sig: signal.signal(sig, _interrupt_handler(run)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = run.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    node_probes = None
    if args.probe_each_node and not result.diverged:
        node_probes = probe_each_node(run.model, run.states, data, config)
        print(NodeProbe.HEADER, flush=True)
        for probe in node_probes:
            print(probe.row(), flush=True)
    linear = {}
    if controls is not None and controls.untrained_linearity is not None and not result.diverged:
        trained = feature_linearity(run.model, run.states, data, config, run.last_probe_features)
        linear["feature_linearity_r2"] = round(trained, 4)
        print(f"the last probe's features as an affine map of the pixels: R^2 {trained:.4f} (untrained "
              f"{controls.untrained_linearity:.4f}; at 1 the network adds nothing a linear map of the image does not)",
              flush=True)
    elif controls is not None and "untrained" in controls.fits:
        print(f"linearity of the features not measured: {len(data.train_images)} training images, not more than "
              f"the {data.train_images[0].numel()} pixels an affine fit would need", flush=True)
    summary = {**result.to_dict(), "config": config.to_dict(), "torch": torch.__version__,
               **(controls.summary() if controls else {}), **linear,
               **({"node_probes": [vars(p) for p in node_probes]} if node_probes else {}),
               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))}
    summary_path = args.summary_json or args.out / "summary.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {summary_path}", flush=True)
    return 130 if result.stop_reason is StopReason.INTERRUPTED else 0


if __name__ == "__main__":
    sys.exit(main())
