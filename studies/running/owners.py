"""Who runs a trial: an identity that says whether that process is alive, judged only on its own machine.

The identity is `machine|pid-namespace|pid|start-time`. The machine is the hostname plus the kernel's
per-boot random id (`/proc/sys/kernel/random/boot_id`): two hosts with the same name differ, and a
rebooted host is a new machine whose old processes are all gone. The PID namespace tells containers on
one kernel apart; the start time tells a process from a later one that reused its PID. A process on
another machine, or where there is no /proc, is never judged here: only its heartbeat can tell.
"""

from __future__ import annotations

import functools
import os
import socket

import optuna

from storage.optuna_access import set_system_attr

OWNER = "pcvit:owner"  # system attr: the identity of the process running the trial
UNKNOWN = "?"


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """`hostname/boot-id`, or `hostname/?` where the kernel does not say its boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = UNKNOWN
    return f"{socket.gethostname()}/{boot}"


def process_identity(pid: int | None = None) -> str | None:
    """The identity of live process `pid` (default: this one), None if it is gone."""
    pid = os.getpid() if pid is None else pid
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = f.read().rsplit(")", 1)[1].split()[19]  # field 22, after the command name
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else f"{machine_id()}|{UNKNOWN}|{pid}|{UNKNOWN}"
    except OSError:
        return f"{machine_id()}|{UNKNOWN}|{pid}|{UNKNOWN}"
    return f"{machine_id()}|{namespace}|{pid}|{start_ticks}"


def on_this_machine(identity: str) -> bool:
    """True when `identity` names a process that this process can see (same boot, same PID namespace)."""
    machine, namespace, _, _ = identity.split("|")
    mine = process_identity()
    if mine is None or UNKNOWN in (namespace, machine.rsplit("/", 1)[-1]):
        return False
    return mine.split("|")[:2] == [machine, namespace]


def owner_is_alive(identity: str) -> bool:
    """True when `identity` is a process on this machine that still runs."""
    return on_this_machine(identity) and process_identity(int(identity.split("|")[2])) == identity


def owner_is_dead(identity: str) -> bool:
    """True only when `identity` is a process on this machine that is gone."""
    return on_this_machine(identity) and process_identity(int(identity.split("|")[2])) != identity


def claim(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record which process runs `trial` (for reaping) and where (for people)."""
    set_system_attr(study, trial, OWNER, process_identity())
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
