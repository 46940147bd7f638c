"""Many workers on one study and one small PostgreSQL server: direct (refused) and through the storage proxy.

    python benchmarks/many_workers.py --workers 10,20,40 --trials 200 --max-connections 20

Starts a PostgreSQL server of its own with `max_connections` (tests/pg.py), then for each worker count:
1. direct: the check `pcvit-launch --cpu-workers N -- --storage postgresql+psycopg2://...` makes before it starts
   anything must refuse, with its one-line connection-budget message (each worker may hold 3 connections);
2. through the proxy: `pcvit-study proxy --connections C` in front of the server, and N worker processes
   joining with `--storage grpc://...`. Each worker is the real worker loop with a trivial objective (sleeps
   `--trial-seconds`, returns a number): it opens the storage, wraps it in the retrying storage, joins the study,
   waits for the proxy's reaper mark, and runs `run_worker` (budget, heartbeats, reaper thread, retries), the same
   functions `pcvit-worker` runs (objective.main) with the same connection settings; only the training is left
   out, so 40 of them fit in memory (a coordinating process does not load torch: about 65 MB each).
Measured: wall time, trials per minute, the peak number of server connections (polled from pg_stat_activity every
0.2 s), and the check that every trial of the budget is counted: COMPLETE == budget, nothing RUNNING or WAITING,
no FAIL left without its retry ("lost"); "surplus" trials are those several workers asked for at the same instant
beyond the budget, failed at once without training and left out of every count (as by a direct worker).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STUDY = {  # a trivial search space; the settings that matter here are the budget and the heartbeat
    "name": "many", "direction": "maximize", "metric": "best_probe_accuracy", "sampler": {"type": "random"},
    "pruner": {"type": "none"}, "max_retries": 2, "checkpoint_every_n_epochs": 0, "heartbeat_interval": 5,
    "grace_period": 30, "controls": False,
    "fixed": {"dataset": "synthetic", "num_blocks": 1, "hidden_size": 8, "epochs": 1, "device": "cpu"},
    "space": {"peak_lr_hidden": {"type": "float", "low": 0.05, "high": 0.11}},
}


def worker(url: str, study_file: str, seconds: float) -> int:
    """One worker process: the real loop (see the module docstring), a trial that only sleeps."""
    import logging

    import storage
    from storage.optuna_access import DB_PATIENCE_S, retrying
    from studies.running.proxy_reaper import wait_for_proxy_reaper
    from studies.running.worker import join_study, run_worker
    from studies.studyfile.samplers import new_sampler_seed
    from studies.studyfile.spec import load_spec

    logging.basicConfig(level=logging.WARNING)
    spec = load_spec(study_file)
    db = retrying(storage.wait_for_storage(url, check_budget=True), patience_s=storage.STARTUP_PATIENCE_S)
    study, spec = join_study(db, url, "many", spec, new_sampler_seed())
    if storage.is_proxy_url(url):
        wait_for_proxy_reaper(study, url)
    db.patience_s = DB_PATIENCE_S

    def objective(trial) -> float:
        value = trial.suggest_float("peak_lr_hidden", 0.05, 0.11)
        time.sleep(seconds)
        return value

    return run_worker(study, spec, objective)


def peak_connections(admin_url: str, database: str, stop: threading.Event, peak: list[int]) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(admin_url)
    conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database)
    conn.autocommit = True
    with conn.cursor() as cur:
        while not stop.is_set():
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,))
            peak[0] = max(peak[0], cur.fetchone()[0])
            stop.wait(0.2)
    conn.close()


def through_proxy(server, n_workers: int, trials: int, proxy_connections: int, seconds: float) -> dict:
    from tests.pg import free_port

    import optuna
    from optuna.trial import TrialState

    import storage
    from studies.running.worker import SURPLUS

    database = f"many{n_workers}"
    url = server.new_database(database)
    folder = Path(tempfile.mkdtemp(prefix="pcvit-many-"))
    study_file = folder / "many.yaml"
    study_file.write_text(yaml.safe_dump({**STUDY, "n_trials": trials}))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proxy = subprocess.Popen([sys.executable, "-m", "studies.cli", "proxy", "--storage", url, "--port", str(port),
                              "--connections", str(proxy_connections)], cwd=REPO, env=env,
                             stdout=open(folder / "proxy.log", "w"), stderr=subprocess.STDOUT)
    stop, peak = threading.Event(), [0]
    watcher = threading.Thread(target=peak_connections, args=(server.url, database, stop, peak), daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                storage.open_storage(f"grpc://127.0.0.1:{port}")
                break
            except storage.StorageUnreachable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        started = time.monotonic()
        workers = [subprocess.Popen([sys.executable, __file__, "--worker", f"grpc://127.0.0.1:{port}", str(study_file),
                                     str(seconds)], cwd=REPO, env=env, stdout=open(folder / f"w{i}.log", "w"),
                                    stderr=subprocess.STDOUT) for i in range(n_workers)]
        codes = [w.wait(timeout=1800) for w in workers]
        wall = time.monotonic() - started
    finally:
        proxy.terminate()
        proxy.wait(timeout=60)
        stop.set()
        watcher.join()
    done = optuna.load_study(study_name="many", storage=storage.open_storage(url)).get_trials()
    states = [t.state for t in done]
    complete = states.count(TrialState.COMPLETE)
    retried = {n for t in done for n in t.system_attrs.get("retry_history", [])}
    surplus = [t for t in done if t.system_attrs.get(SURPLUS)]  # asked at once beyond the budget: failed untrained
    lost = [t for t in done if t.state == TrialState.FAIL and t.number not in retried and t not in surplus]
    return {"workers": n_workers, "exit codes": sorted(set(codes)), "complete": complete, "budget": trials,
            "running or waiting": sum(s in (TrialState.RUNNING, TrialState.WAITING) for s in states),
            "failed": f"{len(lost)} lost, {len(surplus)} surplus", "peak connections": peak[0],
            "wall s": round(wall, 1),
            "trials/min": round(complete / wall * 60, 1), "logs": str(folder)}


def direct(server, n_workers: int) -> str:
    """What `pcvit-launch --cpu-workers N -- --storage URL` says before it starts anything (its own check)."""
    import storage
    from studies.running.launch import check_storage

    url = server.new_database(f"direct{n_workers}")
    try:
        check_storage(["--storage", url], n_workers, patience_s=5)
    except storage.StorageError as exc:
        return f"refused: {str(exc).splitlines()[0][:150]}"
    return "starts (fits the server's connections)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="40", help="comma-separated worker counts")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--trial-seconds", type=float, default=1.0)
    p.add_argument("--max-connections", type=int, default=20)
    p.add_argument("--proxy-connections", type=int, default=8)
    args = p.parse_args(argv)
    from tests.pg import LocalPostgres

    server = LocalPostgres(max_connections=args.max_connections)
    try:
        print(f"PostgreSQL max_connections={server.max_connections}, proxy pool {args.proxy_connections}, "
              f"{args.trials} trials of {args.trial_seconds:g} s each")
        print("| workers | direct (pcvit-launch) | via proxy: complete/budget | running+waiting | failed | "
              "peak server connections | wall s | trials/min |")
        print("|---|---|---|---|---|---|---|---|")
        for n in (int(w) for w in args.workers.split(",")):
            refused = direct(server, n)
            r = through_proxy(server, n, args.trials, args.proxy_connections, args.trial_seconds)
            print(f"| {n} | {refused} | {r['complete']}/{r['budget']} | {r['running or waiting']} | {r['failed']} | "
                  f"{r['peak connections']} | {r['wall s']} | {r['trials/min']} |", flush=True)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        random.seed()
        sys.exit(worker(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    sys.exit(main())
