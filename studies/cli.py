"""`pcvit-study`: check study files, import W&B sweeps, reap dead trials, and report what a study found.

    pcvit-study validate studies/pcvit-12block.yaml
    pcvit-study import-wandb sweep_12block_comprehensive.yaml -o studies/pcvit-12block-wandb.yaml
    pcvit-study reap --storage URL --study-name NAME      # fail + re-queue trials whose worker died
    pcvit-study report --storage URL --study-name NAME [--format markdown|json] [--to-dashboard]
    pcvit-study show-config --storage URL --study-name NAME 17 > trial17.yaml   # for pcvit-train --config
    pcvit-study replay --storage URL --study-name NAME 17 [pcvit-train args]   # re-run trial 17 exactly
    pcvit-study show-trial --storage URL --study-name NAME 17   # its whole record (checkpoint, versions, ...) as JSON
    pcvit-study focus --storage URL --study-name NAME --n-trials 100 -o FILE [--into NEW]   # the follow-up study
    pcvit-study proxy --storage postgresql+psycopg2://... [--host 0.0.0.0] [--port 13000] [--connections 8]
    pcvit-study slurm --storage URL --study-file FILE --tasks 8 --artifact-dir /shared/pcvit [--submit] [-- ARGS]

Exit codes: 0 fine, 2 bad input (an invalid study file, a study or storage that does not exist, bad usage),
with one line naming the file or argument; replay: pcvit-train's. `reap`, `report`, `show-config`, `show-trial`
and `replay` only read (`report --to-dashboard` writes the study's note): they never create a database.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import storage
from studies.studyfile.spec import StudyFileError, load_spec
from studies.running.worker_args import positive_int


def validate(path: str) -> int:
    spec = load_spec(path)
    print(f"{path}: ok: study {spec.name!r}, {len(spec.space)} sampled parameters, {len(spec.fixed)} fixed, "
          f"{spec.n_trials} trials, sampler {spec.sampler['type']}, pruner {spec.pruner['type']}")
    return 0


def import_wandb(sweep: str, out: str, n_trials: int | None) -> int:
    from studies.studyfile.wandb_import import import_file

    text = import_file(sweep, n_trials, note=lambda message: print(f"note: {message}", file=sys.stderr))
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")
    return 0


def reap(url: str, name: str) -> int:
    from studies.running.reaper import reap_once
    from studies.running.worker import open_existing_study

    if storage.is_proxy_url(url):
        raise storage.StorageError(f"{url}: behind a storage proxy, `pcvit-study proxy` reaps (it holds the locks "
                                   "a retry needs); to reap by hand, give the PostgreSQL URL behind it")
    study, spec = open_existing_study(url, name)
    reaped = reap_once(study, spec.grace_period, spec.max_retries)
    print(f"reaped {len(reaped)} dead trial(s){': ' + ', '.join(map(str, reaped)) if reaped else ''}")
    return 0


def report(url: str, name: str, output_format: str, to_dashboard: bool) -> int:
    from studies.results.report import render_markdown, study_summary
    from studies.running.worker import open_existing_study

    study, spec = open_existing_study(url, name)
    summary = study_summary(study, spec)
    if to_dashboard:
        from studies.results.dashboard_notes import write_study_note

        write_study_note(study, spec, summary)
    print(json.dumps(summary, indent=1) if output_format == "json" else render_markdown(summary), end="")
    if output_format == "json":
        print()
    return 0


def show_config(url: str, name: str, number: int) -> int:
    from studies.results.replay import config_yaml

    print(config_yaml(url, name, number), end="")
    return 0


def show_trial(url: str, name: str, number: int) -> int:
    from studies.results.replay import trial_record_json

    print(trial_record_json(url, name, number), end="")
    return 0


def replay(url: str, name: str, number: int, train_args: list[str]) -> int:
    from studies.results.replay import replay as replay_trial

    return replay_trial(url, name, number, train_args)


def focus(url: str, name: str, n_trials: int, out: str, into: str | None) -> int:
    """Write the narrowed follow-up study file; with `into`, create that study and enqueue the best trials."""
    import optuna

    from studies.results.focus import dump, enqueue_best, focus_document
    from studies.running.worker import join_study, open_existing_study
    from studies.studyfile.spec import spec_from_document

    study, spec = open_existing_study(url, name)
    document, best = focus_document(study, spec, n_trials, into or f"{name}-focus")
    db = storage.open_storage(url) if into is not None else None
    if into is not None and into in optuna.get_all_study_names(db):
        raise StudyFileError(f"study {into!r} exists already in {storage.mask_password(url)}; pick a new name")
    with open(out, "w") as f:
        f.write(dump(document))
    print(f"wrote {out}: {len(document['space'])} parameters searched, {len(document['fixed'])} fixed, sampler "
          f"{document['sampler']['type']}, {n_trials} trials, from the best trials {[t.number for t in best]}")
    if into is not None:
        focused = spec_from_document(document, out, dump(document))
        new_study, _ = join_study(db, url, into, focused, sampler_seed=0)
        print(f"created study {into!r} and enqueued {enqueue_best(new_study, focused, best)} trials; run it with "
              f"pcvit-worker --storage URL --study-name {into}")
    return 0


def proxy(url: str, host: str, port: int, connections: int) -> int:
    """Serve the PostgreSQL storage `url` to workers at grpc://HOST:PORT, with the reaper beside it."""
    import logging

    from storage.postgres import PER_WORKER, check_connection_budget, is_postgres_url
    from storage.proxy import serve
    from studies.running.proxy_reaper import ProxyReaper

    if not is_postgres_url(url):
        raise storage.StorageError(f"{storage.mask_password(url)}: the storage proxy serves PostgreSQL only (its row "
                                   "and advisory locks keep retries exact); on one machine, give the workers the "
                                   "SQLite or journal URL directly")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_connection_budget(url, 1, per_client=connections + PER_WORKER, dashboards=0)  # the pool + the reaper's
    backend = storage.open_storage(url, connections=connections)
    reaper = ProxyReaper(storage.open_storage(url)).start()
    print(f"pcvit-study proxy: serving {storage.mask_password(url)} at grpc://{host}:{port} with {connections} "
          f"database connections (+{PER_WORKER} for the reaper)", flush=True)
    try:
        serve(backend, host, port, threads=connections)
    finally:
        reaper.stop()
    return 0


def slurm(args: argparse.Namespace, url: str, worker_args: list[str]) -> int:
    """Write the sbatch script of a SLURM job array of workers; with --submit, submit it."""
    from studies.running.slurm import ArraySpec, submit, write_script
    from studies.running.worker_args import WorkerArgsError, check_worker_args

    spec = ArraySpec(storage_url=url, artifact_dir=args.artifact_dir, tasks=args.tasks, study_name=args.study_name,
                     study_file=args.study_file, gpus_per_task=args.gpus_per_task, time=args.time,
                     partition=args.partition, signal_seconds=args.signal_seconds, job_name=args.job_name,
                     worker_args=worker_args, sbatch_args=args.sbatch_arg,
                     **({"worker_command": shlex.split(args.worker_command)} if args.worker_command else {}))
    spec.check()
    try:
        check_worker_args(["--storage", url, "--artifact-dir", args.artifact_dir, *worker_args,
                           *(["--study-file", spec.study_file] if spec.study_file else []),
                           *(["--study-name", spec.study_name] if spec.study_name else [])])
    except WorkerArgsError as exc:
        raise StudyFileError(f"worker arguments: {exc}") from None
    path = write_script(spec, args.output or f"{args.job_name}.sbatch")
    print(f"wrote {path}: an array of {spec.tasks} task(s), {max(spec.gpus_per_task, 1)} worker(s) each")
    if args.submit:
        print(f"submitted job array {submit(path)}")
    else:
        print(f"submit it with: sbatch {path}")
    return 0


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    worker_args: list[str] = []
    if argv[:1] == ["slurm"] and "--" in argv:  # `pcvit-study slurm ... -- WORKER ARGS`
        worker_args, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    parser = argparse.ArgumentParser(prog="pcvit-study", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("validate", help="check a study file against the schema and the config")
    p.add_argument("file")
    p = commands.add_parser("import-wandb", help="turn a W&B sweep YAML into a study file")
    p.add_argument("sweep")
    p.add_argument("-o", "--output", required=True, help="the study file to write")
    p.add_argument("--n-trials", type=positive_int, help="trial budget (default: the sweep's run_cap or count)")
    for name, text in (("reap", "fail and re-queue trials whose worker is gone"),
                       ("report", "answer the study's questions from its trials")):
        p = commands.add_parser(name, help=text)
        p.add_argument("--storage", help=f"storage URL (default: ${storage.URL_ENV} or {storage.DEFAULT_URL})")
        p.add_argument("--study-name", required=True)
        if name == "report":
            p.add_argument("--format", choices=("markdown", "json"), default="markdown",
                           help="markdown for people (default), json for programs")
            p.add_argument("--to-dashboard", action="store_true",
                           help="also write the report into the study's note in optuna-dashboard")
    for name, text in (("show-config", "print a trial's config as YAML for pcvit-train --config"),
                       ("show-trial", "print a trial's whole record as JSON (user and pcvit: system attributes)"),
                       ("replay", "re-run a trial exactly with pcvit-train (further arguments go to pcvit-train)")):
        p = commands.add_parser(name, help=text)
        p.add_argument("--storage", help=f"storage URL (default: ${storage.URL_ENV} or {storage.DEFAULT_URL})")
        p.add_argument("--study-name", required=True)
        p.add_argument("number", type=int, help="the trial's number")
        if name == "replay":
            p.add_argument("train_args", nargs=argparse.REMAINDER, help="pcvit-train arguments, e.g. --out DIR")
    p = commands.add_parser("focus", help="write a narrowed follow-up study file around the best trials")
    p.add_argument("--storage", help=f"storage URL (default: ${storage.URL_ENV} or {storage.DEFAULT_URL})")
    p.add_argument("--study-name", required=True)
    p.add_argument("--n-trials", type=positive_int, required=True, help="the follow-up's budget")
    p.add_argument("-o", "--output", required=True, help="the study file to write")
    p.add_argument("--into", help="also create this study in the same storage and enqueue the best trials")
    p = commands.add_parser("proxy", help="serve a PostgreSQL storage to many workers at grpc://HOST:PORT "
                                          "(Optuna's gRPC proxy, with the reaper beside it)")
    p.add_argument("--storage", help=f"the PostgreSQL URL (default: ${storage.URL_ENV})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=positive_int, default=13000, help="port to listen on (default 13000)")
    p.add_argument("--connections", type=positive_int, default=8,
                   help="database connections the proxy holds, and its request threads (default 8)")
    p = commands.add_parser("slurm", help="write (and with --submit, submit) the sbatch script of a SLURM job "
                                          "array of workers; worker arguments go after --",
                            usage="pcvit-study slurm --storage URL (--study-file FILE | --study-name NAME) --tasks N "
                                  "--artifact-dir SHARED_DIR [options] [-- WORKER ARGS]",
                            description="Each array task runs one pcvit-worker per GPU until the study's budget "
                                        "is spent (exit 0). Re-queued, cancelled or preempted tasks stop their "
                                        "trials after the current batch and re-queue them; near the time limit a "
                                        "task re-queues itself. Everything after -- goes to every worker.")
    p.add_argument("--storage", help=f"the storage every node reaches: PostgreSQL or grpc://HOST:PORT "
                                     f"(default: ${storage.URL_ENV})")
    p.add_argument("--study-name", help="the study (default: the study file's name)")
    p.add_argument("--study-file", help="the study file (YAML); made absolute")
    p.add_argument("--tasks", type=positive_int, required=True, help="array tasks (--array=0-(N-1))")
    p.add_argument("--gpus-per-task", type=non_negative_int, default=1,
                   help="GPUs per task, one worker each (default 1; 0: one CPU worker per task)")
    p.add_argument("--artifact-dir", required=True,
                   help="artifacts and checkpoints: an absolute path on a file system every node mounts")
    p.add_argument("--time", help="the tasks' time limit (sbatch --time, e.g. 4:00:00)")
    p.add_argument("--partition", help="the partition (sbatch --partition)")
    p.add_argument("--signal-seconds", type=positive_int, default=120,
                   help="warn the task this many seconds before its time limit (default 120): its workers stop "
                        "after their current batch and the task is re-queued")
    p.add_argument("--job-name", default="pcvit-study", help="the job's name (default pcvit-study)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="a further #SBATCH line, e.g. --sbatch-arg=--mem=32G (repeatable)")
    p.add_argument("--worker-command", metavar="COMMAND",
                   help="how a node starts a worker (default: this Python, `-m objective`: the same environment "
                        "must exist at the same path on every node); e.g. pcvit-worker")
    p.add_argument("-o", "--output", help="the script to write (default: JOB_NAME.sbatch)")
    p.add_argument("--submit", action="store_true", help="also submit it with sbatch")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return validate(args.file)
        if args.command == "import-wandb":
            return import_wandb(args.sweep, args.output, args.n_trials)
        url = storage.resolve_url(args.storage)
        if args.command == "show-config":
            return show_config(url, args.study_name, args.number)
        if args.command == "show-trial":
            return show_trial(url, args.study_name, args.number)
        if args.command == "replay":
            return replay(url, args.study_name, args.number, args.train_args)
        if args.command == "reap":
            return reap(url, args.study_name)
        if args.command == "focus":
            return focus(url, args.study_name, args.n_trials, args.output, args.into)
        if args.command == "proxy":
            return proxy(url, args.host, args.port, args.connections)
        if args.command == "slurm":
            return slurm(args, url, worker_args)
        return report(url, args.study_name, args.format, args.to_dashboard)
    except (StudyFileError, storage.StorageError) as exc:
        print(f"pcvit-study: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `pcvit-study report | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
