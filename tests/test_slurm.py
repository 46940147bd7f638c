"""A study as a SLURM job array, through the real scheduler: `pcvit-study slurm --submit` on a single-node
cluster (tests/slurm_cluster.py) with CPU workers on a real PostgreSQL server.

While the first trials run, one array task is re-queued (`scontrol requeue`), one cancelled (`scancel`) and
one warned of its time limit (USR1 to its batch shell, which is what `--signal=B:USR1@...` sends). Every trial
of the budget must end COMPLETE exactly once, none left RUNNING or WAITING, each interrupted trial resumed
from its checkpoint, and the tasks that came back must end with exit code 0.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState

from studies import cli
from studies.running.retries import is_retry
from studies.running.worker_args import parse_worker_args
from studies.running.worker import SURPLUS
from tests.helpers import REPO, checkpoint_epoch, tiny_study, trials, wait_for, worker_env

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage", "ignore::optuna.exceptions.ExperimentalWarning")

N_TRIALS = 5
TASKS = 3
EPOCHS = 12  # with a checkpoint after every epoch: a trial is interrupted midway


PG = "postgresql+psycopg2://pcvit@db.example:5432/pcvit"


@pytest.mark.parametrize("changes, words", [
    ({"--storage": "sqlite:///storage/pcvit.db"}, "SQLite or journal file is not a storage for workers on several"),
    ({"--storage": "storage/journal.log"}, "SQLite or journal file"),
    ({"--storage": "postgresql+psycopg2://pcvit:secret@db/pcvit"}, "holds a password"),
    ({"--artifact-dir": "artifacts"}, "absolute path on the shared file system"),
    ({"--time": "two hours"}, "not a SLURM time"),
])
def test_a_submission_that_cannot_work_across_nodes_is_refused_with_the_reason(tmp_path, capsys, changes, words):
    args = {"--storage": PG, "--study-file": str(REPO / "studies" / "smoke.yaml"), "--tasks": "2",
            "--artifact-dir": str(tmp_path / "shared"), "-o": str(tmp_path / "job.sbatch"), **changes}
    assert cli.main(["slurm", *(part for pair in args.items() for part in pair)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "secret" not in err, err
    assert not (tmp_path / "job.sbatch").exists()


def test_worker_arguments_are_checked_before_the_script_is_written(tmp_path, capsys):
    script = tmp_path / "job.sbatch"
    assert cli.main(["slurm", "--storage", PG, "--study-name", "s", "--tasks", "2", "--artifact-dir",
                     str(tmp_path), "-o", str(script), "--", "--n-trails", "3"]) == 2
    assert "--n-trails" in capsys.readouterr().err and not script.exists()


def test_the_script_runs_one_worker_per_gpu_with_the_workers_arguments(tmp_path):
    script, shared = tmp_path / "job.sbatch", tmp_path / "shared"
    assert cli.main(["slurm", "--storage", PG, "--study-file", str(REPO / "studies" / "smoke.yaml"), "--tasks", "4",
                     "--gpus-per-task", "2", "--artifact-dir", str(shared), "--time", "1-00:00:00", "--partition",
                     "gpu", "--sbatch-arg=--mem=32G", "-o", str(script), "--", "--n-trials", "3"]) == 0
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for line in ("--array=0-3", "--requeue", "--open-mode=append", "--signal=B:USR1@120", "--gpus-per-task=2",
                 "--time=1-00:00:00", "--partition=gpu", "--mem=32G", f"--output={shared}/slurm-logs/"):
        assert f"#SBATCH {line}" in text, line
    assert (shared / "slurm-logs").is_dir()  # SLURM opens the task's log before the script runs
    launch = [line for line in text.splitlines() if " -m objective " in line]
    assert len(launch) == 1 and "for ((i = 0; i < 2; i++))" in text
    command = shlex.split(launch[0].split('"', 2)[2].rstrip(" &"))
    args = parse_worker_args(command[command.index("objective") + 1:])  # the worker's own parser
    assert (args.storage, args.artifact_dir, args.n_trials) == (PG, str(shared), 3)
    assert command[:3] == [sys.executable, "-m", "objective"]


def test_the_worker_command_can_be_the_installed_script(tmp_path):
    script = tmp_path / "job.sbatch"
    assert cli.main(["slurm", "--storage", PG, "--study-name", "pcvit-12block", "--tasks", "2", "--gpus-per-task",
                     "0", "--artifact-dir", str(tmp_path), "--worker-command", "pcvit-worker", "-o", str(script)]) == 0
    launch = [line for line in script.read_text().splitlines() if line.startswith("pcvit-worker ")]
    assert len(launch) == 1 and "--gpus-per-task" not in script.read_text()


def task_states(slurm, job: str) -> dict[int, dict[str, str]]:
    """Array task id -> `scontrol show job` fields (JobState, ExitCode, Restarts, Reason, JobId)."""
    out = slurm.run("scontrol", "-o", "show", "job", job, check=False).stdout
    tasks = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "ArrayTaskId" in fields and fields["ArrayTaskId"].isdigit():
            tasks[int(fields["ArrayTaskId"])] = fields
    return tasks


def start_now_when_pending(slurm, job: str, task: int, timeout: float) -> None:
    """A re-queued task waits for its begin time (SLURM holds it a while); once it is pending, start it now.

    Not in the same second as its kill: slurmd revokes a killed job's credential with a time stamp in whole
    seconds and refuses a launch whose credential is not newer ("Job N already killed, do not launch batch
    job"), which ends the task FAILED 1:0 without running. SLURM's own hold before a re-queued task starts
    again avoids that; forcing the start must wait past it too.
    """
    wait_for(lambda: task_states(slurm, job).get(task, {}).get("JobState") == "PENDING", timeout,
             f"task {job}_{task} to be pending again", interval=0.5)
    time.sleep(2.5)
    slurm.run("scontrol", "update", f"JobId={job}_{task}", "StartTime=now")


@pytest.mark.slow
def test_a_study_as_a_slurm_array_survives_requeue_cancel_and_the_time_limit(slurm, postgres_server, tmp_path):
    url = postgres_server.new_database("slurm_array")
    study_file = tiny_study(tmp_path, name="slurm-array", n_trials=N_TRIALS, controls=False,
                            fixed={"epochs": EPOCHS, "train_subset": 300})
    artifacts, script = tmp_path / "shared", tmp_path / "study.sbatch"
    env = {**worker_env(), "SLURM_CONF": slurm.env["SLURM_CONF"]}  # sbatch hands it to the tasks
    submitted = subprocess.run(
        [sys.executable, "-m", "studies.cli", "slurm", "--storage", url, "--study-file", str(study_file),
         "--tasks", str(TASKS), "--gpus-per-task", "0", "--artifact-dir", str(artifacts), "--signal-seconds", "30",
         "-o", str(script), "--submit"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted job array (\d+)", submitted.stdout).group(1)
    text = script.read_text()
    for line in ("--array=0-2", "--requeue", "--open-mode=append", "--signal=B:USR1@30"):
        assert f"#SBATCH {line}" in text

    def logs() -> str:
        return "".join(f"\n--- {p.name} ---\n{p.read_text()[-3000:]}"
                       for p in sorted((artifacts / "slurm-logs").glob("*.log")))

    # all three tasks busy, each trial past its first checkpoint with epochs to go
    def busy():
        running = [t for t in trials(url, "slurm-array") if t.state == TrialState.RUNNING]
        midway = all(1 <= checkpoint_epoch(t) <= EPOCHS - 4 for t in running)
        return running if len(running) == TASKS and midway else None

    try:
        interrupted = wait_for(busy, 150, "three trials running past a checkpoint", interval=0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}{logs()}{slurm.log_tail()}") from None
    slurm.run("scontrol", "requeue", f"{job}_0")
    slurm.run("scancel", f"{job}_1")
    slurm.run("scancel", "--batch", "--signal=USR1", f"{job}_2")  # what SLURM sends 30 s before the time limit
    start_now_when_pending(slurm, job, 0, 60)
    start_now_when_pending(slurm, job, 2, 60)  # its batch shell re-queued it

    def done():
        tasks = task_states(slurm, job)
        ended = all(tasks.get(i, {}).get("JobState") in ("COMPLETED", "CANCELLED", "FAILED") for i in range(TASKS))
        return tasks if ended else None

    try:
        tasks = wait_for(done, 240, "the array to finish", interval=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{task_states(slurm, job)}{logs()}") from None

    # SLURM: the cancelled task stays cancelled; the two that came back finished the study and exited 0
    assert tasks[1]["JobState"] == "CANCELLED", tasks[1]
    for i in (0, 2):
        assert (tasks[i]["JobState"], tasks[i]["ExitCode"]) == ("COMPLETED", "0:0"), \
            f"task {i}: {tasks[i]}{logs()}{slurm.log_tail()}"  # a string: pytest shows it whole, not a cut repr
        assert int(tasks[i]["Restarts"]) >= 1, tasks[i]
    assert "the time limit is near" in (artifacts / "slurm-logs" / f"pcvit-study-{job}_2.log").read_text()

    # the study: every trial of the budget counted once, nothing lost or left behind
    final = trials(url, "slurm-array")
    assert not [t.number for t in final if t.state in (TrialState.RUNNING, TrialState.WAITING)], logs()
    trained = [t for t in final if not t.system_attrs.get(SURPLUS)]
    fresh = [t for t in trained if not is_retry(t)]
    complete = [t for t in trained if t.state == TrialState.COMPLETE]
    assert len(fresh) == N_TRIALS and len(complete) == N_TRIALS, [(t.number, t.state) for t in final]
    lineage = {t.number: t.system_attrs.get("failed_trial", t.number) for t in complete}
    assert sorted(lineage.values()) == sorted(t.number for t in fresh)  # one COMPLETE per fresh trial
    assert len({tuple(sorted(t.params.items())) for t in complete}) == N_TRIALS  # no trial trained twice

    # each interrupted trial failed for a retry, and its retry went on from its checkpoint
    by_lineage = {lineage[t.number]: t for t in complete}
    for stopped in interrupted:
        after = next(t for t in final if t.number == stopped.number)
        assert after.state == TrialState.FAIL, after
        assert "stopped by SIGTERM" in after.user_attrs.get("fail_reason", ""), after.user_attrs
        retry = by_lineage[stopped.number]
        assert is_retry(retry) and retry.params == stopped.params
        assert retry.user_attrs["resumed_after_epoch"] >= checkpoint_epoch(stopped) >= 1, retry.user_attrs
