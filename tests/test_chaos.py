"""Chaos: six workers under pcvit-launch on one PostgreSQL study, killed and stopped at random, through a
server restart and an outage longer than the grace period. Nothing may be lost, doubled or left running.

Faults are placed by progress (finished trials), not by the clock, so a slow machine sees the same run.
The figures are printed at the end (`pytest -s` shows them).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

import storage
from storage.checkpoints import PREFIX
from studies.results.report import outcome_trials
from studies.running.retries import RETRY_REASON
from studies.running.worker import SURPLUS
from tests.helpers import REPO, checkpoint_epoch, tiny_study, worker_env
from studies.running.records import record

WORKERS, TRIALS, EPOCHS, GRACE = 6, 40, 3, 4
SIGNALS = [signal.SIGKILL, signal.SIGTERM] * 3  # six worker faults, in random order
DEADLINE_S = 420


def children(pid: int) -> list[int]:
    """The live worker processes of the launcher `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in "ZX":
                found.append(int(entry))
    return found


def study_trials(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="chaos", storage=storage.open_storage(url)).get_trials()
    except Exception:  # noqa: BLE001 - not created yet, or the server is down on purpose
        return []


@pytest.mark.slow
def test_chaos_loses_nothing_and_doubles_nothing(postgres_server, tmp_path):
    if not getattr(postgres_server, "can_restart", False):
        pytest.skip("the test server is not ours to stop")
    url, art, logs = postgres_server.new_database("chaos"), tmp_path / "art", tmp_path / "logs"
    study_file = tiny_study(tmp_path, name="chaos", n_trials=TRIALS, max_retries=4, heartbeat_interval=1,
                            grace_period=GRACE, checkpoint_every_n_epochs=1, fixed={"epochs": EPOCHS})
    rng = random.Random(9)
    signals = rng.sample(SIGNALS, len(SIGNALS))
    # progress (finished trials) at which each fault strikes: a worker signal, or the server
    plan = sorted([(4 + 5 * i, "signal") for i in range(len(signals))] + [(12, "restart"), (22, "outage")])
    started = time.monotonic()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "studies.running.launch", "--cpu-workers", str(WORKERS), "--log-dir", str(logs),
         "--restart-backoff", "0.5", "--max-restarts", "20", "--",
         "--storage", url, "--study-file", str(study_file), "--artifact-dir", str(art)],
        cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, stopped, server_faults = [], [], []
    try:
        while plan and launcher.poll() is None and time.monotonic() - started < DEADLINE_S:
            done = sum(t.state.is_finished() for t in study_trials(url) if not t.system_attrs.get(SURPLUS))
            if done < plan[0][0]:
                time.sleep(0.5)
                continue
            _, fault = plan.pop(0)
            if fault == "restart":
                postgres_server.restart(down_s=1)
                server_faults.append("restart (down 1 s)")
            elif fault == "outage":
                postgres_server.stop()
                time.sleep(GRACE + 4)  # longer than the grace period: live trials must survive it
                postgres_server.start()
                server_faults.append(f"outage ({GRACE + 4} s, grace {GRACE} s)")
            else:
                pids = [pid for pid in children(launcher.pid) if pid not in killed + stopped]  # one signal each
                if pids:
                    pid, signum = rng.choice(pids), signals.pop(0)
                    os.kill(pid, signum)
                    (killed if signum == signal.SIGKILL else stopped).append(pid)
        out, _ = launcher.communicate(timeout=max(10, DEADLINE_S - (time.monotonic() - started)))
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            launcher.communicate(timeout=60)
    wall = time.monotonic() - started
    worker_logs = "".join(log.read_text() for log in logs.glob("*.log"))

    study = optuna.load_study(study_name="chaos", storage=storage.open_storage(url))
    every = study.get_trials()
    final = outcome_trials(study)
    counted = [t for t in final if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    retries = [t for t in every if "retry_history" in t.system_attrs]
    by_number = {t.number: t for t in every}
    retried_numbers = [t.system_attrs["retry_history"][-1] for t in retries]
    duplicates = len(retried_numbers) - len(set(retried_numbers))
    zombies = [t.number for t in every if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    reaped = [t for t in every if t.state == TrialState.FAIL and RETRY_REASON in t.system_attrs
              and "worker stopped by" not in t.user_attrs.get("fail_reason", "")]
    unclaimed = [t.number for t in reaped if "worker" not in t.user_attrs]  # killed between ask and claim
    reaped_alive = [t.number for t in reaped
                    if "worker" in t.user_attrs and int(t.user_attrs["worker"].rsplit(":", 1)[1]) not in killed]
    resumed = [t for t in retries if t.user_attrs.get("resumed_after_epoch")]
    predecessor = {t.number: by_number[t.system_attrs["retry_history"][-1]] for t in retries}
    retrained = [t.number for t in retries  # its predecessor had trained; it must have resumed after the end
                 if t.state in (TrialState.COMPLETE, TrialState.PRUNED)  # (one killed before it could load its
                 # checkpoint trained nothing; its own retry is judged instead)
                 and (record(predecessor[t.number]).get("checkpoint") or {}).get("trained")
                 and t.user_attrs.get("resumed_after_epoch") != checkpoint_epoch(predecessor[t.number])]
    gaps = [t.number for t in retries if t.state.is_finished() and t.state != TrialState.FAIL
            and list(t.intermediate_values) != list(range(1, len(t.intermediate_values) + 1))]
    orphans = sorted(p.name for p in art.glob(f"*{PREFIX}*")) if art.exists() else []
    told_twice = worker_logs.count("was finished by another process")
    print(f"\nchaos: faults injected: {len(killed)} SIGKILL, {len(stopped)} SIGTERM, {', '.join(server_faults)}; "
          f"trials: {len(every)} in storage, {len(counted)} counted of {TRIALS}; retries: {len(retries)} "
          f"({len(reaped)} reaped, {len(unclaimed)} of them before a claim, {len(resumed)} resumed from a "
          f"checkpoint); lost: {TRIALS - len(counted)}; "
          f"duplicates: {duplicates}; zombies: {len(zombies)}; live trials reaped: {len(reaped_alive)}; "
          f"retrained: {len(retrained)}; orphaned checkpoints: {len(orphans)}; wall time: {wall:.0f} s")
    print(out.splitlines()[-1 - WORKERS] if out else "launcher printed nothing")
    for t in [t for t in final if t not in counted] + [by_number[n] for n in reaped_alive + retrained]:
        print(f"trial {t.number}: {t.state.name}, {t.user_attrs.get('worker')}, {t.user_attrs.get('fail_reason')}, "
              f"resumed after {t.user_attrs.get('resumed_after_epoch')}, predecessor's checkpoint "
              f"{predecessor[t.number].user_attrs.get('checkpoint') if t.number in predecessor else None}")

    assert launcher.returncode == 0, out[-3000:]
    assert not plan, f"faults not injected before the study ended: {plan}"
    assert f"{WORKERS} workers finished, 0 failed" in out, out[-3000:]
    assert len(counted) == len(final) == TRIALS  # every budget trial finished exactly once
    assert not zombies and duplicates == 0 and not reaped_alive and not retrained and not gaps and not orphans
    assert len(reaped) <= len(killed) and all("never claimed" in by_number[n].user_attrs["fail_reason"]
                                               for n in unclaimed)
    assert told_twice == 0, "a trial was told after another process had finished it"
    assert killed and stopped and all(t.user_attrs["epochs_run"] == EPOCHS for t in counted
                                      if t.state == TrialState.COMPLETE)
