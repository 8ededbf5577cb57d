"""Who holds a job's lease: a worker process named by host, pid and pid namespace, and whether it is dead.

A job whose worker process was killed (out of memory, SIGKILL) keeps its lease until the lease expires. When
the dead process was on this host and in this pid namespace, its death is a fact, not a guess: the job may be
taken over at once (`store.jobs.claim(dead_owner=...)`), so a killed pool child's job runs again within
seconds rather than after the lease. Any other owner (another host or container, an old-format name) counts
as alive; its lease runs out as before.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:")
    except OSError:
        return "-"


def _host() -> str:
    """The host part of owner names: `ATELIER_WORKER_HOST`, else the machine's host name. Workers that share a
    host name but not a pid namespace (containers on the host network) each need their own."""
    return os.environ.get("ATELIER_WORKER_HOST") or socket.gethostname()


def current_owner() -> str:
    """This process's lease-owner name: `host:pid:pid-namespace`."""
    return f"{_host()}:{os.getpid()}:{_pid_namespace()}"


def host_prefix() -> str:
    """What every lease-owner name of this host begins with."""
    return f"{_host()}:"


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a killed child its parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust the signal check
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def owner_is_dead(owner: str | None) -> bool:
    """True only for an owner on this host and pid namespace whose process is gone."""
    if not owner:
        return False
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    host, pid, namespace = parts
    if host != _host() or namespace != _pid_namespace() or namespace == "-":
        return False
    return int(pid) != os.getpid() and not _alive(int(pid))
