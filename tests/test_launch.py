"""pcvit-launch with a fake worker: real processes, real signals, real log files; no GPU needed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from studies.running import launch
from tests.helpers import REPO, tiny_study, trials, worker_env


# Prints its environment and arguments, then sleeps; on SIGTERM/SIGINT says so and exits with
# 128 + the signal, as pcvit-worker does after failing its trial.
FAKE_WORKER = r"""
import json, os, signal, sys, time
args = sys.argv[1:]
opts = dict(zip(args[::2], args[1::2]))
def on_signal(signum, frame):
    print("got", signal.Signals(signum).name, flush=True)
    sys.exit(128 + signum)
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN if opts.get("--ignore-signals") else on_signal)
print("env", json.dumps({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "args": args, "pid": os.getpid(),
                         "threads": os.environ.get("OMP_NUM_THREADS")}), flush=True)
if os.environ.get("CUDA_VISIBLE_DEVICES") == opts.get("--fail-on-gpu"):
    time.sleep(float(opts.get("--fail-after", "0")))
    sys.exit(int(opts.get("--fail-code", "3")))
if "--tempfail-times" in opts:  # exit 75 (storage unreachable) that many times, counted in a file
    count = int(open(opts["--counter"]).read()) if os.path.exists(opts["--counter"]) else 0
    open(opts["--counter"], "w").write(str(count + 1))
    if count < int(opts["--tempfail-times"]):
        sys.exit(75)
if "--crash-once" in opts and not os.path.exists(opts["--crash-once"] + os.environ["CUDA_VISIBLE_DEVICES"]):
    open(opts["--crash-once"] + os.environ["CUDA_VISIBLE_DEVICES"], "w").close()
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
time.sleep(float(opts.get("--sleep", "0")))
"""


@pytest.fixture
def fake_worker(tmp_path) -> str:
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return f"{sys.executable} {path}"


def launcher_args(tmp_path, fake_worker, *own: str) -> list[str]:
    return ["--log-dir", str(tmp_path / "logs"), "--worker-cmd", fake_worker, *own]


def reported_env(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.startswith("env ")]
    assert len(lines) == 1, log.read_text()
    return json.loads(lines[0][4:])


def test_pins_each_worker_to_its_gpu_with_its_own_log(tmp_path, fake_worker):
    code = launch.main(launcher_args(tmp_path, fake_worker, "--gpus", "0,1", "--workers-per-gpu", "2")
                       + ["--", "--study-name", "s", "--sleep", "0.2"])
    assert code == 0
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["worker-gpu0-0.log", "worker-gpu0-1.log", "worker-gpu1-0.log", "worker-gpu1-1.log"]
    envs = {name: reported_env(tmp_path / "logs" / name) for name in logs}
    assert [env["gpu"] for env in envs.values()] == ["0", "0", "1", "1"]
    assert all(env["args"] == ["--study-name", "s", "--sleep", "0.2"] for env in envs.values())
    assert len({env["pid"] for env in envs.values()}) == 4


def test_cpu_workers_see_no_gpu_and_share_the_cores(tmp_path, fake_worker, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch.main(launcher_args(tmp_path, fake_worker, "--cpu-workers", "2")) == 0
    for k in range(2):
        env = reported_env(tmp_path / "logs" / f"worker-cpu-{k}.log")
        assert env["gpu"] == "" and env["threads"] == str(max(1, os.cpu_count() // 2))


def test_the_users_thread_setting_wins(tmp_path, fake_worker, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert launch.main(launcher_args(tmp_path, fake_worker, "--cpu-workers", "3")) == 0
    assert reported_env(tmp_path / "logs" / "worker-cpu-0.log")["threads"] == "7"


def fake_nvidia_smi(tmp_path, monkeypatch, script: str) -> None:
    """A stand-in for nvidia-smi (there is no GPU here), first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text("#!/bin/sh\n" + script)
    (bindir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_without_gpus_it_starts_one_cpu_worker(tmp_path, fake_worker, monkeypatch, capsys):
    fake_nvidia_smi(tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")
    assert launch.main(launcher_args(tmp_path, fake_worker)) == 0
    assert "no GPU found" in capsys.readouterr().out
    assert reported_env(tmp_path / "logs" / "worker-cpu-0.log")["gpu"] == ""


def test_gpus_come_from_nvidia_smi(tmp_path, fake_worker, monkeypatch, capsys):
    listing = "echo 'GPU 0: NVIDIA H100 (UUID: GPU-a1)'; echo 'GPU 1: NVIDIA H100 (UUID: GPU-b2)'\n"
    fake_nvidia_smi(tmp_path, monkeypatch, listing)
    assert launch.main(launcher_args(tmp_path, fake_worker, "--workers-per-gpu", "2", "--dry-run")) == 0
    planned = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert planned == ["gpu0-0", "gpu0-1", "gpu1-0", "gpu1-1"]
    assert not (tmp_path / "logs").exists()  # a dry run starts nothing


def test_cuda_visible_devices_limits_the_gpus(tmp_path, fake_worker, monkeypatch, capsys):
    fake_nvidia_smi(tmp_path, monkeypatch, "echo 'GPU 0: x'; echo 'GPU 1: y'; echo 'GPU 2: z'\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert launch.main(launcher_args(tmp_path, fake_worker, "--dry-run")) == 0
    assert capsys.readouterr().out.startswith("gpu2-0: CUDA_VISIBLE_DEVICES='2'")


@pytest.mark.parametrize("code", [1, 2])
def test_bad_input_or_repeated_failures_are_not_restarted_and_fail_the_launch(tmp_path, fake_worker, capsys, code):
    args = launcher_args(tmp_path, fake_worker, "--gpus", "0,1", "--restart-backoff", "0.1")
    assert launch.main(args + ["--", "--fail-on-gpu", "1", "--fail-code", str(code), "--sleep", "1"]) == 1
    out = capsys.readouterr().out
    assert "2 workers finished, 1 failed, 0 restarts" in out and "restarting" not in out
    summary = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "exit 0" in summary["gpu0-0"] and "FAILED" not in summary["gpu0-0"]
    assert f"exit {code}" in summary["gpu1-0"] and "FAILED" in summary["gpu1-0"]


def test_a_killed_worker_is_restarted_and_the_launch_succeeds(tmp_path, fake_worker, capsys):
    args = launcher_args(tmp_path, fake_worker, "--gpus", "0,1", "--restart-backoff", "0.1")
    assert launch.main(args + ["--", "--crash-once", str(tmp_path / "crashed-gpu"), "--sleep", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished: killed by SIGKILL") == 2 and out.count("restarted: pid") == 2
    assert "2 workers finished, 0 failed, 2 restarts" in out
    assert out.count("restarted 1x after: killed by SIGKILL") == 2


def test_a_crashing_worker_is_restarted_at_most_max_restarts_times(tmp_path, fake_worker, capsys):
    args = launcher_args(tmp_path, fake_worker, "--gpus", "0", "--restart-backoff", "0.05", "--max-restarts", "2")
    assert launch.main(args + ["--", "--fail-on-gpu", "0", "--fail-code", "3"]) == 1
    out = capsys.readouterr().out
    assert out.count("finished: exit 3") == 3 and "1 failed, 2 restarts" in out


def test_a_worker_that_lost_its_storage_is_restarted_past_the_cap_until_it_answers(tmp_path, fake_worker, capsys):
    args = launcher_args(tmp_path, fake_worker, "--gpus", "0", "--restart-backoff", "0.05", "--max-restarts", "1")
    assert launch.main(args + ["--", "--tempfail-times", "4", "--counter", str(tmp_path / "count")]) == 0
    out = capsys.readouterr().out
    assert out.count("finished: exit 75") == 4 and out.count("(until the storage answers)") == 4
    assert "1 workers finished, 0 failed, 4 restarts" in out


def test_the_restart_cap_counts_crashes_in_a_row_and_starts_afresh_after_a_long_run():
    restarts = launch.Restarts(command=["true"], limit=2, backoff=1.0)
    worker = launch.Worker("gpu0-0", "0", Path("w.log"), exits=[137], streak=2)
    assert restarts.delay(worker) is None  # two restarts in a row already
    worker.streak = 0  # what wait_all does after a run of RESET_AFTER_S or more
    assert restarts.delay(worker) == 1.0
    worker.exits.append(launch.EXIT_STORAGE_UNREACHABLE)
    worker.streak = 9
    assert restarts.delay(worker) == 60.0  # no cap for a lost storage, the back-off capped at a minute
    worker.exits.append(2)
    assert restarts.delay(worker) is None  # bad input: never


def test_a_worker_dead_after_the_budget_was_spent_is_not_restarted_nor_a_failure(tmp_path, fake_worker, capsys):
    args = launcher_args(tmp_path, fake_worker, "--gpus", "0,1", "--restart-backoff", "0.1")
    assert launch.main(args + ["--", "--fail-on-gpu", "1", "--fail-code", "137", "--fail-after", "1"]) == 0
    out = capsys.readouterr().out  # gpu0 exits 0 at once: the budget is spent; gpu1 dies a second later
    assert "worker gpu1-0 finished: exit 137" in out and "restarting" not in out
    assert "2 workers finished, 0 failed, 0 restarts" in out


def start_launcher(tmp_path, fake_worker, *args: str) -> subprocess.Popen:
    """The launcher as its own process (signals go to it, not to pytest); waits for all workers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "studies.running.launch", *launcher_args(tmp_path, fake_worker, *args)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 30
    logs = tmp_path / "logs"
    while time.monotonic() < deadline:
        ready = [p for p in logs.glob("*.log") if "env " in p.read_text()] if logs.exists() else []
        if len(ready) == 2:
            return proc
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"workers did not start: {proc.communicate()[0]}")


@pytest.mark.parametrize(
    ("received", "forwarded"),
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT), (signal.SIGHUP, signal.SIGTERM)],
    ids=["TERM", "INT", "HUP-as-TERM"],
)
@pytest.mark.slow
def test_signals_reach_every_worker(tmp_path, fake_worker, received, forwarded):
    proc = start_launcher(tmp_path, fake_worker, "--gpus", "0,1", "--", "--sleep", "60")
    proc.send_signal(received)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + forwarded, out  # stopped, as a shell reports it; not "failed"
    assert f"{received.name} received, forwarding {forwarded.name} to 2 workers" in out
    assert "2 workers finished, 0 failed" in out and out.count(f"stopped by {forwarded.name}") == 4
    for log in (tmp_path / "logs").glob("*.log"):
        assert log.read_text().count(f"got {forwarded.name}") == 1  # forwarded once, not twice


@pytest.mark.slow
def test_workers_that_ignore_the_signal_are_killed(tmp_path, fake_worker):
    proc = start_launcher(tmp_path, fake_worker, "--gpus", "0,1", "--kill-after", "0.5",
                          "--", "--sleep", "60", "--ignore-signals", "1")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 1, out
    assert out.count("killed by SIGKILL") >= 2, out


@pytest.mark.parametrize(
    "bad",
    [["--gpus", "0,x"], ["--gpus", "0", "--cpu-workers", "2"], ["--workers-per-gpu", "0"], ["--cpu-workers", "0"]],
)
def test_bad_options_are_rejected_by_name(tmp_path, fake_worker, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        launch.main(launcher_args(tmp_path, fake_worker, *bad))
    assert exc.value.code == 2
    assert bad[-2].lstrip("-").split("-")[0] in capsys.readouterr().err


def test_missing_worker_command_is_named(tmp_path, capsys):
    code = launch.main(["--cpu-workers", "1", "--log-dir", str(tmp_path), "--worker-cmd", "/nonexistent/pcvit-worker"])
    assert code == 2
    assert "/nonexistent/pcvit-worker" in capsys.readouterr().err


@pytest.mark.slow
def test_too_many_workers_for_postgres_start_none(tmp_path, fake_worker, postgres_server, capsys):
    url = postgres_server.url
    code = launch.main(launcher_args(tmp_path, fake_worker, "--cpu-workers", "40") + ["--", "--storage", url])
    assert code == 2
    err = capsys.readouterr().err
    assert "40 workers x 3" in err and f"max_connections {postgres_server.max_connections}" in err
    assert not (tmp_path / "logs").exists()
    assert launch.main(launcher_args(tmp_path, fake_worker, "--cpu-workers", "2") + ["--", "--storage", url]) == 0


@pytest.mark.slow
def test_default_worker_command_is_the_real_worker(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert launch.main(["--cpu-workers", "1", "--log-dir", str(tmp_path), "--", "--help"]) == 0
    assert "usage: pcvit-worker" in (tmp_path / "worker-cpu-0.log").read_text()


@pytest.mark.parametrize(("worker_args", "words"), [
    (["--study-name", "s", "--n-trials", "0"], "argument --n-trials: must be at least 1, got 0"),
    (["--study-name", "s", "--trials", "3"], "unrecognized arguments: --trials 3"),
    ([], "give --study-name NAME"),
    (["--study-file", "no/such.yaml"], "--study-file no/such.yaml: no such file"),
])
def test_bad_worker_arguments_start_no_worker(tmp_path, capsys, worker_args, words):
    assert launch.main(["--cpu-workers", "3", "--log-dir", str(tmp_path / "logs"), "--", *worker_args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pcvit-launch: error: worker arguments: ") and words in err and err.count("\n") == 1
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_real_workers_outlast_a_database_outage_longer_than_a_minute(tmp_path, postgres_server):
    """Two real CPU workers start while PostgreSQL is down for 100 s: the launcher waits its 10 s and starts
    them anyway; each waits its minute, exits 75
    (storage unreachable), is restarted with back-off past the restart cap, joins once the server is back,
    and the study runs to its end."""
    url = postgres_server.new_database("outage")
    study_file = tiny_study(tmp_path, n_trials=6)
    postgres_server.stop()
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "studies.running.launch", "--cpu-workers", "2", "--log-dir", str(tmp_path / "logs"),
             "--restart-backoff", "2", "--max-restarts", "0", "--", "--storage", url, "--study-file",
             str(study_file), "--artifact-dir", str(tmp_path / "art")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env())
        time.sleep(max(0.0, 100 - (time.monotonic() - started)))  # 10 + 60 s + start-up, then ~25 s more
    finally:
        postgres_server.start()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    for slot in ("cpu-0", "cpu-1"):  # each slot lost its storage, was restarted, and worked again
        assert f"worker {slot} finished: exit {launch.EXIT_STORAGE_UNREACHABLE}" in out, out
        log = (tmp_path / "logs" / f"worker-{slot}.log").read_text()
        assert "worker joins study 'tiny'" in log, log[-3000:]
    assert "(until the storage answers)" in out
    states = [t.state for t in trials(url, "tiny")]
    assert len(states) == 6 and all(s == optuna.trial.TrialState.COMPLETE for s in states), states
