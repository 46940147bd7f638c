"""pcvit-launch: start N study workers on this machine, one or more per GPU, and wait for them.

    pcvit-launch --gpus 0,1 --workers-per-gpu 2 [--log-dir DIR] -- <worker args>

Each worker is its own process (`python -m objective <worker args>`, i.e. pcvit-worker), pinned
to one GPU with CUDA_VISIBLE_DEVICES and writing to its own log, DIR/worker-gpuG-K.log. Workers
share nothing but the study's storage, so one that dies costs only its trial. SIGTERM and SIGINT
(and SIGHUP, as SIGTERM) are forwarded to every worker (each fails and re-queues its running trial); workers
still alive --kill-after seconds later are killed.

A worker that dies abnormally (SIGKILL, the OOM killer, a crash, a signal the launcher did not send) is
restarted in its slot after a back-off (--restart-backoff seconds, doubling), at most --max-restarts
times, while the study has budget left (no worker has yet exited 0, which a worker does only when the
budget is spent and no trial is left). Exit 2 (bad input) and exit 1 (three trials in a row failed:
a systematic error) are never restarted: a restart would only fail again, or burn budget.
The launcher exits when every worker has, with a summary of their exit codes and restarts: 1 if any
failed, else 128 + the signal if it was stopped by one, else 0.

Without --gpus it uses the GPUs in CUDA_VISIBLE_DEVICES, else those `nvidia-smi -L` lists; with
none (or --cpu-workers N) it starts CPU workers, with CUDA_VISIBLE_DEVICES="".
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
DEFAULT_WORKER_CMD = f"{shlex.quote(sys.executable)} -m objective"
STDOUT = "-"  # --log-dir value: workers write to the launcher's output (docker logs)
_GPU_TOKEN = re.compile(r"\d+|(GPU|MIG)-[0-9A-Za-z/-]+")


@dataclass
class Worker:
    name: str  # gpu0-1: the second worker on GPU 0; cpu-0: the first CPU worker
    gpu: str  # the value of CUDA_VISIBLE_DEVICES, "" for a CPU worker
    log_path: Path
    threads: int | None = None  # OMP_NUM_THREADS for a CPU worker: the cores shared out, not oversubscribed
    process: subprocess.Popen | None = field(default=None, repr=False)
    exits: list[int] = field(default_factory=list)  # exit codes of this slot's processes, in order
    restart_at: float | None = None  # monotonic time of a pending restart
    started_at: float = 0.0  # monotonic time the slot's current process started
    streak: int = 0  # restarts since the slot last ran a while (RESET_AFTER_S): what the cap counts

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcvit-launch",
        usage="pcvit-launch [options] -- <worker args>",
        description="Start study workers on this machine, pinned one GPU each, and wait for them.",
    )
    parser.add_argument("--gpus", help="comma-separated GPU indices or UUIDs (default: all visible GPUs)")
    parser.add_argument("--workers-per-gpu", type=int, default=1, help="workers sharing each GPU (default 1)")
    parser.add_argument("--cpu-workers", type=int, help="start this many CPU workers instead of GPU workers")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/logs"),
                        help="one log per worker (default runs/logs); `-`: the launcher's own output")
    parser.add_argument(
        "--worker-cmd", default=DEFAULT_WORKER_CMD,
        help="the worker command, before the worker args (default: this Python's `-m objective`)",
    )
    parser.add_argument("--kill-after", type=float, default=60.0,
                        help="seconds after a forwarded signal before workers still alive get SIGKILL")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="restarts of each worker that died abnormally (default 5)")
    parser.add_argument("--restart-backoff", type=float, default=2.0,
                        help="seconds before the first restart of a worker, doubling with each (default 2)")
    parser.add_argument("--dry-run", action="store_true", help="print the workers it would start, start none")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher args before the first `--`, worker args after it."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def parse_gpus(spec: str) -> list[str]:
    tokens = [token.strip() for token in spec.split(",") if token.strip()]
    bad = [token for token in tokens if not _GPU_TOKEN.fullmatch(token)]
    if bad or not tokens:
        raise ValueError(f"--gpus {spec!r}: expected comma-separated GPU indices or UUIDs, bad: {bad or spec!r}")
    return tokens


def visible_gpus() -> list[str]:
    """GPUs this machine offers: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`; [] if none.

    nvidia-smi rather than torch: importing torch costs seconds and the launcher needs no CUDA.
    """
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        spec = os.environ["CUDA_VISIBLE_DEVICES"].strip()
        return parse_gpus(spec) if spec and spec != "-1" else []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    return re.findall(r"^GPU (\d+):", listing.stdout, flags=re.MULTILINE)


def plan_workers(args: argparse.Namespace) -> list[Worker]:
    if args.max_restarts < 0 or args.restart_backoff < 0:
        raise ValueError("--max-restarts and --restart-backoff must not be negative")
    if args.workers_per_gpu < 1:
        raise ValueError(f"--workers-per-gpu must be at least 1, got {args.workers_per_gpu}")
    if args.cpu_workers is not None:
        if args.gpus:
            raise ValueError("give either --gpus or --cpu-workers, not both")
        if args.cpu_workers < 1:
            raise ValueError(f"--cpu-workers must be at least 1, got {args.cpu_workers}")
    gpus = [] if args.cpu_workers is not None else (parse_gpus(args.gpus) if args.gpus else visible_gpus())
    if not gpus:
        count = args.cpu_workers or 1
        # Each worker's OpenMP threads would otherwise take every core and spin against the others'
        # (a tiny trial measured 27x slower with 4 workers on 2 cores).
        threads = max(1, (os.cpu_count() or 1) // count)
        return [Worker(f"cpu-{k}", "", log_path(args.log_dir, f"cpu-{k}"), threads) for k in range(count)]
    return [
        Worker(f"gpu{gpu}-{k}", gpu, log_path(args.log_dir, f"gpu{gpu}-{k}"))
        for gpu in gpus
        for k in range(args.workers_per_gpu)
    ]


def log_path(log_dir: Path, name: str) -> Path:
    return log_dir if str(log_dir) == STDOUT else log_dir / f"worker-{name}.log"


def storage_url(worker_args: list[str]) -> str | None:
    """The storage the workers will use: their --storage, else OPTUNA_STORAGE."""
    for i, arg in enumerate(worker_args):
        if arg == "--storage" and i + 1 < len(worker_args):
            return worker_args[i + 1]
        if arg.startswith("--storage="):
            return arg.split("=", 1)[1]
    return os.environ.get("OPTUNA_STORAGE")


def check_storage(worker_args: list[str], workers: int, patience_s: float = 10.0) -> None:
    """On PostgreSQL, fail before starting anything if the server lacks connections for all workers. A server
    or storage proxy (grpc://) that does not answer yet (starting, restarting) is waited for up to `patience_s`
    seconds; after that StorageUnreachable goes to the caller, which starts the workers anyway (an outage is
    waited out by restarting them, not a reason to give up the slots)."""
    from storage.postgres import StorageUnreachable, check_connection_budget, is_postgres_url
    from storage.proxy import is_proxy_url, open_proxy

    url = storage_url(worker_args)
    if not is_postgres_url(url) and not is_proxy_url(url):
        return
    deadline = time.monotonic() + patience_s
    while True:
        try:
            if is_proxy_url(url):  # the proxy holds the connections: only check that it answers
                return open_proxy(url).close()
            return check_connection_budget(url, clients=workers)
        except StorageUnreachable as exc:
            if time.monotonic() + 2 > deadline:
                raise
            print(f"pcvit-launch: {exc}; retrying in 2 s", flush=True)
            time.sleep(2)


def start(worker: Worker, command: list[str]) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": worker.gpu}
    worker.started_at = time.monotonic()
    if worker.threads is not None and "OMP_NUM_THREADS" not in os.environ:  # the user's setting wins
        env["OMP_NUM_THREADS"] = str(worker.threads)
    if str(worker.log_path) == STDOUT:  # in a container: the launcher's own output is the log
        sys.stdout.flush()
        worker.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        return
    worker.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(worker.log_path, "ab") as log:
        log.write(f"--- pcvit-launch {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n".encode())
        log.flush()
        # A session of its own: a terminal's Ctrl-C reaches the launcher only, which forwards it
        # once, instead of every worker getting it twice.
        worker.process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stopped_by(code: int, signum: int | None) -> bool:
    """Did the worker end because of the signal we forwarded (killed by it, or exit 128 + it)?"""
    return signum is not None and code in (-signum, 128 + signum)


def describe_exit(code: int, signum: int | None = None) -> str:
    if stopped_by(code, signum):
        return f"stopped by {signal.Signals(signum).name}"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


class Forwarder:
    """While active: SIGTERM and SIGINT go on to every live worker (SIGHUP as SIGTERM: workers handle
    TERM and INT only). Installed before the first worker starts, so none is ever orphaned."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.sent: int | None = None  # the first signal forwarded
        self.since = math.inf  # when it was forwarded (monotonic seconds)
        self.previous: dict = {}

    def __enter__(self) -> "Forwarder":
        self.previous = {sig: signal.signal(sig, self.forward) for sig in FORWARDED_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.process is not None and w.returncode is None]

    def forward(self, signum: int, _frame=None) -> None:
        sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        print(f"pcvit-launch: {signal.Signals(signum).name} received, forwarding "
              f"{signal.Signals(sent).name} to {len(self.alive())} workers", flush=True)
        if self.sent is None:
            self.sent, self.since = sent, time.monotonic()
        for worker in self.alive():
            _send(worker, sent)


EXIT_STORAGE_UNREACHABLE = 75  # EX_TEMPFAIL: a worker whose storage did not answer at start-up; try again later
RESET_AFTER_S = 600.0  # a worker that ran this long before it died starts a fresh count of restarts


def restartable(code: int) -> bool:
    """Did the worker die abnormally? 0: budget spent; 1: three failed trials in a row; 2: bad input.
    75: the storage was unreachable: restartable, and without a cap (see Restarts)."""
    return code not in (0, 1, 2)


@dataclass
class Restarts:
    """When to restart a dead worker: `command` (None: never), at most `limit` times, after `backoff` s doubling."""

    command: list[str] | None = None
    limit: int = 0
    backoff: float = 2.0
    budget_spent: bool = False  # a worker exited 0: no trial is left, a dead slot is not needed any more

    def delay(self, worker: Worker) -> float | None:
        """Seconds until `worker` (just exited) restarts, None if it stays down. A worker that lost its storage
        (exit 75) is restarted until the storage returns or the study ends, whatever the cap; every other
        abnormal exit counts against the cap, which starts afresh once a worker has run RESET_AFTER_S."""
        code = worker.exits[-1]
        if self.command is None or self.budget_spent or not restartable(code):
            return None
        if code != EXIT_STORAGE_UNREACHABLE and worker.streak >= self.limit:
            return None
        return min(self.backoff * 2 ** worker.streak, 60.0)


def wait_all(forwarder: Forwarder, kill_after: float, restarts: Restarts | None = None) -> None:
    """Wait for every started worker, reporting each exit and restarting the dead ones as `restarts` says;
    SIGKILL those alive kill_after s after a signal."""
    restarts = restarts or Restarts()
    reported: list[subprocess.Popen] = []  # the processes whose exit was handled (kept: ids get reused)
    killed = False
    while True:
        alive = forwarder.alive()  # before the exits are read: a worker ending in between is still reported
        for worker in forwarder.workers:
            process = worker.process
            if process is not None and process.poll() is not None and not any(p is process for p in reported):
                reported.append(process)
                worker.exits.append(process.returncode)
                restarts.budget_spent |= process.returncode == 0
                if time.monotonic() - worker.started_at >= RESET_AFTER_S:
                    worker.streak = 0  # it worked a while: an old streak of crashes says nothing now
                print(f"pcvit-launch: worker {worker.name} finished: "
                      f"{describe_exit(process.returncode, forwarder.sent)}", flush=True)
                delay = restarts.delay(worker) if forwarder.sent is None else None
                if delay is not None:
                    worker.streak += 1
                    worker.restart_at = time.monotonic() + delay
                    cap = ("until the storage answers" if process.returncode == EXIT_STORAGE_UNREACHABLE
                           else f"restart {worker.streak} of at most {restarts.limit} in a row")
                    print(f"pcvit-launch: restarting worker {worker.name} in {delay:g} s ({cap})", flush=True)
        for worker in forwarder.workers:
            if worker.restart_at is not None and (forwarder.sent is not None or restarts.budget_spent):
                worker.restart_at = None  # stopped, or the study ended meanwhile
            elif worker.restart_at is not None and time.monotonic() >= worker.restart_at:
                worker.restart_at = None
                start(worker, restarts.command)
                print(f"pcvit-launch: worker {worker.name} restarted: pid {worker.process.pid}", flush=True)
        pending = any(w.restart_at is not None for w in forwarder.workers)
        if not alive and not pending and not forwarder.alive():  # the last check: one restarted just now
            return
        if not killed and time.monotonic() - forwarder.since > kill_after:
            for worker in forwarder.alive():
                print(f"pcvit-launch: worker {worker.name} still running {kill_after:g} s after the "
                      "signal; sending SIGKILL", flush=True)
                _send(worker, signal.SIGKILL)
            killed = True
        time.sleep(0.1)


def _send(worker: Worker, signum: int) -> None:
    try:
        worker.process.send_signal(signum)
    except ProcessLookupError:
        pass  # it exited in between


def summary(workers: list[Worker], signum: int | None, budget_spent: bool = False) -> tuple[str, int]:
    """One line per worker, and the launcher's exit code: 1 if any failed, 128 + signal if stopped, else 0.

    A worker that died abnormally after the budget was spent did not fail the study: no trial was left
    for it (its own was re-queued and run by the others before they exited 0)."""
    def failed(w: Worker) -> bool:
        code = w.exits[-1]
        return code != 0 and not stopped_by(code, signum) and not (budget_spent and restartable(code))

    failures = [w for w in workers if failed(w)]
    restarted = sum(len(w.exits) - 1 for w in workers)
    lines = [f"pcvit-launch: {len(workers)} workers finished, {len(failures)} failed, {restarted} restarts"]
    for w in workers:
        mark = "  FAILED" if w in failures else ""
        earlier = ", ".join(describe_exit(code) for code in w.exits[:-1])
        again = f"  restarted {len(w.exits) - 1}x after: {earlier}" if earlier else ""
        lines.append(f"  {w.name:<12} pid {w.process.pid:<8} {describe_exit(w.exits[-1], signum):<20} "
                     f"{w.log_path}{mark}{again}")
    code = 1 if failures else (128 + signum if signum else 0)
    return "\n".join(lines), code


def main(argv: list[str] | None = None) -> int:
    own_args, worker_args = split_argv(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    args = parser.parse_args(own_args)
    try:
        workers = plan_workers(args)
    except ValueError as exc:
        parser.error(str(exc))
    command = shlex.split(args.worker_cmd) + worker_args
    if args.worker_cmd == DEFAULT_WORKER_CMD:  # the real worker: refuse its arguments here, not in N logs
        from studies.running.worker_args import WorkerArgsError, check_worker_args

        try:
            check_worker_args(worker_args)
        except WorkerArgsError as exc:
            print(f"pcvit-launch: error: worker arguments: {exc}; started no worker", file=sys.stderr)
            return 2
    if args.cpu_workers is None and not workers[0].gpu:
        print("pcvit-launch: no GPU found (CUDA_VISIBLE_DEVICES, nvidia-smi -L): starting 1 CPU worker", flush=True)
    if args.dry_run:
        for w in workers:
            print(f"{w.name}: CUDA_VISIBLE_DEVICES={w.gpu!r} {shlex.join(command)} > {w.log_path}")
        return 0
    from storage.postgres import StorageUnreachable

    try:
        check_storage(worker_args, len(workers))
    except StorageUnreachable as exc:  # an outage: the workers wait for it, and are restarted until it ends
        print(f"pcvit-launch: {exc}; starting the workers anyway: each waits a minute for the storage and is "
              f"restarted until it answers (its connection budget is not checked)", flush=True)
    except RuntimeError as exc:  # StorageError: too few connections for the workers, a wrong password
        print(f"pcvit-launch: {exc}", file=sys.stderr)
        return 2

    with Forwarder(workers) as forwarder:
        for worker in workers:
            if forwarder.sent is not None:
                break  # stopped while starting: start no more
            try:
                start(worker, command)
            except OSError as exc:
                print(f"pcvit-launch: cannot start worker command {command[0]!r}: {exc}", file=sys.stderr)
                for started in forwarder.alive():  # all or none: stop the ones already running
                    _send(started, signal.SIGTERM)
                forwarder.since = time.monotonic()
                wait_all(forwarder, args.kill_after)
                return 2
            print(f"pcvit-launch: worker {worker.name} pid {worker.process.pid} "
                  f"CUDA_VISIBLE_DEVICES={worker.gpu!r} log {worker.log_path}", flush=True)
        restarts = Restarts(command, args.max_restarts, args.restart_backoff)
        wait_all(forwarder, args.kill_after, restarts)
    text, code = summary([w for w in workers if w.process], forwarder.sent, restarts.budget_spent)
    print(text, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
