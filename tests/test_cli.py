import json
import os
import signal
import subprocess
import sys

import pytest

from pcvit.cli import main
from tests.helpers import tiny_config_file

SMALLER = dict(num_blocks=1, train_subset=32, test_subset=16, validation_subset=8, inference_steps=2)


def tiny_args(folder, **changes) -> list[str]:
    return [*tiny_config_file(folder, **SMALLER, **changes), "--no-progress"]


def test_train_writes_summary_with_the_documented_keys(tmp_path, capsys):
    summary = tmp_path / "s.json"
    assert main([*tiny_args(tmp_path, epochs=2, reconstruction_every_n_epochs=1), "--out", str(tmp_path / "out"),
                 "--summary-json", str(summary)]) == 0
    data = json.loads(summary.read_text())
    for key in ("best_probe_accuracy", "best_train_mse", "final_train_mse", "best_val_mse", "epochs_run",
                "stop_reason", "diverged", "wall_time_s", "device"):
        assert key in data
    assert data["epochs_run"] == 2 and data["config"]["num_blocks"] == 1
    assert (tmp_path / "out" / "reconstruction_epoch002.png").is_file()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert len(rows) == 2


@pytest.mark.parametrize("args, needle", [
    (["--set", "hidden_size=24", "--num-heads", "5"], "num_heads"),
    (["--set", "nonsense=1"], "nonsense"),
    (["--set", "hidden_size"], "KEY=VALUE"),
    (["--dataset", "imagenet"], "dataset"),
])
def test_bad_input_exits_2_naming_the_key(args, needle, tmp_path, capsys):
    assert main([*tiny_args(tmp_path), *args, "--out", str(tmp_path)]) == 2
    assert needle in capsys.readouterr().err


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a job started in the background by a shell


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_cleanly_and_still_write_the_summary(tmp_path, sig):
    summary = tmp_path / "s.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pcvit.cli", *tiny_args(tmp_path), "--epochs", "100000", "--set",
                             "use_early_stopping=false", "--out", str(tmp_path), "--summary-json", str(summary)],
                            stdout=subprocess.PIPE, text=True, env=env, preexec_fn=ignore_sigint)
    try:
        for line in proc.stdout:  # wait for the first epoch row
            if line.strip().startswith("1 "):
                break
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(sig)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    data = json.loads(summary.read_text())
    assert data["stop_reason"] == "interrupted" and data["stop_detail"] == sig.name
    assert 1 <= data["epochs_run"] < 100000
