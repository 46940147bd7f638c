"""How far each matmul precision moves the golden replay from the original's float32 numbers.

    python benchmarks/precision_drift.py --device cuda --out DIR     # on a GPU: float32 vs tf32 (vs bf16)
    python benchmarks/precision_drift.py                             # on a CPU every precision is float32

Replays the golden cases of tests/golden/data through `Run.train_on_batch`, as tests/golden/test_replay.py does
(case a from the run start through both of its batches, case b's two warm-up batches), once per precision and
implementation. For every batch it reports the largest error of the final states, the energy at the weight step
and the train MSE relative to the reference array's scale, and of the weights after the step in absolute terms,
beside the golden tests' tolerances (1e-4 relative; 5e-5 absolute on weights). The original ran TF32 on its
GPUs (`precision: auto`); this measures what that costs against its float32 reference arrays. One JSON line per
(case, batch, implementation, precision); `--out` also appends them to DIR/drift.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcvit.config import IMPLEMENTATIONS  # noqa: E402
from pcvit.data import ImageData  # noqa: E402
from pcvit.inference import States  # noqa: E402
from pcvit.train import Run  # noqa: E402
from tests.golden.adapter import (config_from_meta, image_data, load_case, load_weights, states_as_golden,  # noqa: E402
                                  to_uint8, weights_from_model)

CASES = {  # case -> its batches in order: (input, states after, weights after, train MSE, energy trace or None)
    "train_step_basic": [("prev.x", "", "w.", "prev.train_mse", None),
                         ("x", "step3.", "w_after.", "train_mse", "E_trace")],
    "train_step_warmup": [(f"batch{k}.x", f"batch{k}.step3.", f"batch{k}.w_after.", f"batch{k}.train_mse",
                           f"batch{k}.E_trace") for k in range(2)],
}
TOLERANCES = {"states": 1e-4, "energy": 1e-4, "train_mse": 1e-4, "weights_abs": 5e-5}  # README section 8


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def replay(case: str, implementation: str, precision: str, device: torch.device) -> list[dict]:
    npz, meta = load_case(case)
    config = config_from_meta(meta, implementation).replace(precision=precision, device=str(device))
    cpu = image_data(to_uint8(npz[CASES[case][0][0]]))
    data = ImageData(cpu.name, *(t.to(device) for t in (cpu.train_images, cpu.train_labels, cpu.test_images,
                                                         cpu.test_labels, cpu.mean, cpu.std)))
    run = Run(config, data)
    load_weights(run.model, npz, "runstart.w.")
    top = torch.as_tensor(npz["runstart.h0"]).to(device)
    run.states = States(top, run.model.feedforward(top)[0])  # the run-start INIT
    records = []
    for k, (x_name, states, weights, mse_name, energy_name) in enumerate(CASES[case]):
        x = data.normalise(torch.as_tensor(to_uint8(npz[x_name])).to(device))
        energy, mse = run.train_on_batch(x)
        record = {
            "case": case, "batch": k, "implementation": implementation, "precision": run.precision,
            "states": max(rel(v, npz[states + name]) for name, v in states_as_golden(run.states).items()),
            "weights_abs": max(float(np.abs(v - npz[weights + name]).max())
                               for name, v in weights_from_model(run.model).items()),
            "train_mse": rel(mse.item(), npz[mse_name]),
        }
        if energy_name:  # the previous batch of case a stores no energy trace
            record["energy"] = rel(energy.item(), npz[energy_name][-1])
        record["within_golden_tolerances"] = all(record[k] <= tol for k, tol in TOLERANCES.items() if k in record)
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--precision", default="float32,tf32", help="comma list of float32, tf32, bf16")
    p.add_argument("--impl", default=",".join(IMPLEMENTATIONS), help="comma list of implementations")
    p.add_argument("--out", type=Path, default=None, help="folder for drift.jsonl")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    lines = []
    for case in CASES:
        for implementation in args.impl.split(","):
            for precision in args.precision.split(","):
                for record in replay(case, implementation, precision, device):
                    record.update(device=str(device), asked=precision, torch=torch.__version__)
                    lines.append(json.dumps(record))
                    print(lines[-1], flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "drift.jsonl", "a") as f:
            f.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
