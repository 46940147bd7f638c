"""A throwaway single-node SLURM cluster for the tests: munged, slurmctld and slurmd in a temp folder.

Why not a mock: what the SLURM support must get right (the array, `--requeue`, the signals that
`scontrol requeue`, `scancel` and a time limit send, the exit codes SLURM records) is the scheduler's
behaviour, not ours. The daemons run in the foreground with a private config (`SLURM_CONF`) on loopback
ports the OS picked, with their own munge socket and key; nothing of the machine's SLURM (if any) is used
or touched. One node, CPUs only; `slurmd` is told it has `cpus` CPUs whatever the machine has, so a
test's array runs its tasks side by side on a small machine. The daemons run as the current user
(root in CI); the client commands see the cluster through `.env`.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
NODE = "pcvit-node"
PARTITION = "pcvit"


class SlurmUnavailable(RuntimeError):
    """The SLURM binaries are not installed; tests skip with this (and only this)."""


class SlurmStartError(RuntimeError):
    """The binaries are there but the cluster did not come up: an error, with the daemons' logs."""


def find_binaries() -> dict[str, str]:
    found = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in BINARIES}
    missing = [name for name, path in found.items() if not path]
    if missing:
        raise SlurmUnavailable(f"SLURM binaries not found: {', '.join(missing)}; install them with "
                               "`apt-get install slurm-wlm munge`")
    return found  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd, started in `__init__`, stopped by `close()` (also at exit)."""

    def __init__(self, cpus: int = 4, start_timeout: float = 60.0) -> None:
        self.bin = find_binaries()
        self.root = Path(tempfile.mkdtemp(prefix="pcvit-slurm-"))
        atexit.register(self.close)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []
        try:
            self._start_munge()
            self._write_config()
            self._start("slurmctld", [self.bin["slurmctld"], "-D", "-i", "-f", str(self.conf)])
            self._start("slurmd", [self.bin["slurmd"], "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait_until_idle(start_timeout)
        except BaseException:
            self.close()
            raise

    # --- the daemons -------------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.root / "munge.sock"
        self._start("munged", [self.bin["munged"], "-F", "-f", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munged.pid'}",
                               f"--seed-file={self.root / 'munged.seed'}", f"--log-file={self.root / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged's socket")

    def _write_config(self) -> None:
        for folder in ("state", "spool"):
            (self.root / folder).mkdir()
        user = pwd.getpwuid(os.geteuid()).pw_name
        r = self.root
        lines = [
            "ClusterName=pcvit-test",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "KillWait=30",
            "MinJobAge=300",
            f"NodeName={NODE} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            "RealMemory=1000 State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.out", "ab")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))
        log.close()

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            dead = [p for p in self.processes if p.poll() is not None]
            if dead:
                raise SlurmStartError(f"a SLURM daemon exited (code {dead[0].returncode}) while waiting for "
                                       f"{what}{self.log_tail()}")
            time.sleep(0.3)
        raise SlurmStartError(f"timed out after {timeout} s waiting for {what}{self.log_tail()}")

    def _wait_until_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        self._wait(idle, timeout, f"node {NODE} to be idle")

    # --- the clients -------------------------------------------------------------------------------------
    def run(self, command: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command (`sbatch`, `scontrol`, ...) against this cluster."""
        path = self.bin.get(command) or shutil.which(command) or command
        out = subprocess.run([path, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{command} {' '.join(args)} exited {out.returncode}: {out.stderr}{self.log_tail()}")
        return out

    def log_tail(self, chars: int = 2500) -> str:
        text = ""
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            try:
                text += f"\n--- {name} ---\n" + (self.root / name).read_text(errors="replace")[-chars:]
            except OSError:
                pass
        return text

    def close(self) -> None:
        """Cancel what still runs, stop the daemons and delete the folder; safe to call twice."""
        if self.processes and all(p.poll() is None for p in self.processes):
            try:  # a failed test may leave tasks running: their workers get SIGTERM and stop
                self.run("scancel", f"--user={pwd.getpwuid(os.geteuid()).pw_name}", check=False)
                self._wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 45, "the jobs to end")
            except (SlurmStartError, subprocess.SubprocessError, OSError):
                pass
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes = []
        shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.close)
