"""A study as a SLURM job array: `pcvit-study slurm` writes the sbatch script (and with --submit submits it).

Each array task runs one worker per GPU it was given (one CPU worker with --gpus-per-task 0); every worker
pulls trials until the study's budget is spent and then exits 0, so a finished study shows as COMPLETED.

What stops a task, and what the script does about it:
* `scontrol requeue`, `scancel`, preemption: SLURM sends SIGTERM to every process of the task, the workers
  included. Each worker stops its trial after the current batch, fails and re-queues it in the study (to
  resume from its last checkpoint) and exits 143. The batch shell only traps the signal so that it outlives
  its workers; it does not send a second SIGTERM, which a worker would take as "stop at once". A requeued
  task starts new workers, which take the re-queued trials first.
* The time limit: `--signal=B:USR1@SECONDS` warns the batch shell alone that many seconds before it. The
  shell sends SIGTERM to its workers, waits for them, and if any was stopped (rather than done) re-queues
  its own array task with `scontrol requeue`, so the task comes back and its trials resume.
The array runs with `--requeue` and `--open-mode=append` (a requeued task adds to its log). Artifacts and
checkpoints are files in --artifact-dir, which every node must see (a shared file system): a trial stopped
on one node resumes on another. The storage must be a database server (or the storage proxy) that every
node reaches; SQLite and journal files are refused.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import storage

DEFAULT_SIGNAL_SECONDS = 120
_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|\d+-\d+|unlimited|infinite", re.I)  # M, M:S, H:M:S, D-H, D-H:M, ...


class SlurmError(storage.StorageError):
    """A submission that cannot work (the message says why); pcvit-study prints it and exits 2."""


@dataclass
class ArraySpec:
    """What the sbatch script needs; `check()` refuses what cannot work across nodes."""

    storage_url: str
    artifact_dir: str
    tasks: int
    study_name: str | None = None
    study_file: str | None = None
    gpus_per_task: int = 1
    time: str | None = None
    partition: str | None = None
    signal_seconds: int = DEFAULT_SIGNAL_SECONDS
    job_name: str = "pcvit-study"
    log_dir: str | None = None
    worker_command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "objective"])
    worker_args: list[str] = field(default_factory=list)
    sbatch_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        if storage.local_file(self.storage_url) is not None:
            raise SlurmError(f"{self.storage_url}: a SQLite or journal file is not a storage for workers on "
                             "several nodes (file locks over a network file system lose trials); give a "
                             "PostgreSQL URL or the storage proxy's grpc://HOST:PORT")
        if re.match(r"^[a-z0-9+]+://[^/@]*:[^/@]*@", self.storage_url):
            raise SlurmError(f"{storage.mask_password(self.storage_url)}: the URL holds a password, which the "
                             "script would keep in plain text; put it in ~/.pgpass or $PGPASSWORD (sbatch "
                             "passes your environment to the tasks)")
        if not self.artifact_dir:
            raise SlurmError("--artifact-dir is required: a folder on a file system every node mounts (NFS, "
                             "Lustre, GPFS, ...); checkpoints live there, and a trial stopped on one node "
                             "resumes on another")
        if not os.path.isabs(self.artifact_dir):
            raise SlurmError(f"--artifact-dir {self.artifact_dir}: give an absolute path on the shared file "
                             "system (the tasks start in other folders, on other nodes)")
        if not (self.study_name or self.study_file):
            raise SlurmError("give --study-name NAME or --study-file FILE")
        if self.study_file and not os.path.isabs(self.study_file):
            self.study_file = os.path.abspath(self.study_file)
        if self.tasks < 1:
            raise SlurmError(f"--tasks must be at least 1, got {self.tasks}")
        if self.gpus_per_task < 0:
            raise SlurmError(f"--gpus-per-task must be 0 (CPU workers) or more, got {self.gpus_per_task}")
        if self.signal_seconds < 1:
            raise SlurmError(f"--signal-seconds must be at least 1, got {self.signal_seconds}")
        if self.time is not None and not _TIME.fullmatch(self.time):
            raise SlurmError(f"--time {self.time!r}: not a SLURM time (MINUTES, HH:MM:SS, D-HH:MM, ...)")


def _directive(name: str, value: object = None) -> str:
    return f"#SBATCH --{name}" + ("" if value is None else f"={value}")


def sbatch_script(spec: ArraySpec) -> str:
    """The batch script for `spec` (checked first)."""
    spec.check()
    logs = log_dir(spec)
    directives = [
        _directive("job-name", spec.job_name),
        _directive("array", f"0-{spec.tasks - 1}"),
        _directive("ntasks", 1),
        _directive("requeue"),
        _directive("open-mode", "append"),
        _directive("signal", f"B:USR1@{spec.signal_seconds}"),
        _directive("output", os.path.join(logs, "%x-%A_%a.log")),
    ]
    if spec.gpus_per_task:
        directives.append(_directive("gpus-per-task", spec.gpus_per_task))
    if spec.time:
        directives.append(_directive("time", spec.time))
    if spec.partition:
        directives.append(_directive("partition", spec.partition))
    directives += [f"#SBATCH {shlex.quote(arg)}" for arg in spec.sbatch_args]
    study = (["--study-file", spec.study_file] if spec.study_file else []) + (
        ["--study-name", spec.study_name] if spec.study_name else [])
    worker = [*spec.worker_command, "--storage", spec.storage_url, *study, "--artifact-dir", spec.artifact_dir,
              *spec.worker_args]
    command = " ".join(shlex.quote(part) for part in worker)
    if spec.gpus_per_task:  # one worker per GPU of the task, each seeing only its own
        launch = (f'IFS=, read -ra visible <<< "${{CUDA_VISIBLE_DEVICES:-}}"\n'
                  f'for ((i = 0; i < {spec.gpus_per_task}; i++)); do\n'
                  f'    CUDA_VISIBLE_DEVICES="${{visible[$i]:-$i}}" {command} &\n'
                  f'    pids+=($!)\n'
                  f'done\n')
    else:
        launch = f"{command} &\npids+=($!)\n"
    return _TEMPLATE.format(directives="\n".join(directives), workers=max(spec.gpus_per_task, 1), launch=launch,
                            artifacts=shlex.quote(spec.artifact_dir), logs=shlex.quote(logs))


_TEMPLATE = """#!/bin/bash
# A PC-ViT study as a SLURM job array, written by `pcvit-study slurm`: each task runs {workers} worker(s), one
# per GPU, until the study's budget is spent (exit 0). SIGTERM (scontrol requeue, scancel, preemption)
# reaches the workers from SLURM itself: each stops after its current batch and re-queues its trial in the
# study. USR1 (the time limit is near) reaches this shell alone: it stops the workers the same way, then
# re-queues this array task so that it comes back and resumes the trials from their checkpoints.
{directives}

set -u
mkdir -p {artifacts} {logs}
echo "pcvit-study slurm: task ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}} (restart ${{SLURM_RESTART_COUNT:-0}})" \\
     "on $(hostname) at $(date -Is)"

pids=()
time_limit=0
on_term() {{ echo "pcvit-study slurm: SIGTERM; the workers got it too and stop after their current batch"; }}
on_usr1() {{
    echo "pcvit-study slurm: the time limit is near; stopping the workers and re-queueing this task"
    time_limit=1
    kill -TERM "${{pids[@]}}" 2>/dev/null
}}
trap on_term TERM
trap on_usr1 USR1

{launch}
status=0
stopped=0
for pid in "${{pids[@]}}"; do
    while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait until the worker is gone
        wait "$pid"
    done
    wait "$pid"  # its exit status (bash keeps it)
    rc=$?
    echo "pcvit-study slurm: worker $pid exited $rc"
    if ((rc > 128)); then stopped=1; fi
    if ((rc != 0 && status == 0)); then status=$rc; fi
done

if ((time_limit && stopped)); then
    echo "pcvit-study slurm: re-queueing ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
    scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit "$status"
"""


def log_dir(spec: ArraySpec) -> str:
    return spec.log_dir or os.path.join(spec.artifact_dir, "slurm-logs")


def write_script(spec: ArraySpec, path: str | os.PathLike) -> Path:
    """Write the script, and make the log folder: SLURM opens a task's log before the script runs."""
    path = Path(path)
    script = sbatch_script(spec)
    try:
        os.makedirs(log_dir(spec), exist_ok=True)
    except OSError as exc:
        raise SlurmError(f"cannot make the log folder {log_dir(spec)}: {exc}") from None
    path.write_text(script)
    path.chmod(0o755)
    return path


def submit(path: str | os.PathLike) -> str:
    """Run `sbatch` on the script; return the array's job id."""
    try:
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run this on a SLURM login node, or submit the script yourself "
                         "(`sbatch SCRIPT`)") from None
    if out.returncode != 0:
        raise SlurmError(f"sbatch {path} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]
