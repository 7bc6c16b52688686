"""Telling an out-of-memory kill from any other SIGKILL.

The kernel's OOM killer sends SIGKILL, which reads like a kill from outside.
The memory cgroup counts its kills (``oom_kill`` in ``memory.events`` on cgroup
v2, in ``memory.oom_control`` on v1), so a worker that died of SIGKILL while
that counter of the client's cgroup went up was most likely killed for memory.
Workers share the client's cgroup unless someone moved them. Without a memory
cgroup, the machine-wide count in ``/proc/vmstat`` (Linux 4.13+) tells the same,
less precisely: some process on the machine was killed for memory meanwhile.
"""

from __future__ import annotations

import os

__all__ = ["oom_kill_count"]

_ROOT = "/sys/fs/cgroup"


def _candidates() -> list[str]:
    files: list[str] = []
    try:
        with open("/proc/self/cgroup") as cgroups:
            lines = cgroups.read().splitlines()
    except OSError:
        return files
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if controllers == "":  # cgroup v2
            files += [os.path.join(_ROOT, path, "memory.events"), os.path.join(_ROOT, "memory.events")]
        elif "memory" in controllers.split(","):
            base = os.path.join(_ROOT, "memory")
            files += [
                os.path.join(base, path, "memory.oom_control"),
                os.path.join(base, "memory.oom_control"),
            ]
    return files


def oom_kill_count() -> int | None:
    """How many processes the OOM killer has killed in this process's memory cgroup, if known.

    Without a memory cgroup, how many it killed on the whole machine since boot.
    """
    for name in [*_candidates(), "/proc/vmstat"]:
        try:
            with open(name) as counters:
                for line in counters:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None
