"""The benchmark scripts still run (on the CPU, tiny sizes): benchmarks/gpu_check.sh relies on them on a GPU."""

from __future__ import annotations

import importlib.util
import json

from tests.helpers import REPO


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_precision_drift_replays_the_golden_cases_within_their_tolerances(tmp_path):
    assert script("precision_drift").main(["--device", "cpu", "--impl", "vjp", "--out", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "drift.jsonl").read_text().splitlines()]
    assert len(records) == 8  # 2 cases x 2 batches x float32, tf32
    assert all(r["within_golden_tolerances"] and r["precision"] == "float32" for r in records)  # no TF32 on a CPU


def test_bench_train_records_the_precision_it_ran(tmp_path, capsys):
    assert script("bench_train").main(["--device", "cpu", "--config", "1/8/1/4/2", "--batches", "2", "--warmup", "1",
                                       "--impl", "plain,vjp", "--out", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["implementation"] for r in records] == ["plain", "vjp"]
    assert all(r["precision"] == "float32" and r["ms_per_batch"] > 0 for r in records)  # auto on a CPU


def test_bench_augment_reports_the_cost_per_batch_of_both_shapes(tmp_path):
    assert script("bench_augment").main(["--device", "cpu", "--batch", "8", "--config", "1/8/1/2", "--repeats", "2",
                                         "--train-repeats", "1", "--out", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "augment.jsonl").read_text().splitlines()]
    assert [r["images"] for r in records] == [[8, 3, 32, 32], [8, 1, 28, 28]]
    assert all(r["augment_ms_per_batch"] > 0 and 0 < r["augment_share"] < 1 for r in records)


def test_bench_linearity_times_both_fits_on_the_same_data(capsys):
    assert script("bench_linearity").main(["--sizes", "300x20x3,400x30x2", "--repeats", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["300x20x3", "400x30x2"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and float(r[4]) > 0.99 and float(r[5]) > 0.99 for r in rows)
