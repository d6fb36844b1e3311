"""Process attribution: who made a connection. `Attributor` asks the kernel
lineage first (lineage.py); `ProcessResolver` reads /proc when a connection
arrives.

Lookups are cached by (pid, start time) so a reused PID never takes another
process's identity, and the cache is bounded.
"""

from __future__ import annotations

import dataclasses
import pwd
from collections import OrderedDict
from functools import lru_cache
from typing import Protocol

import psutil

from egress_auditor.attribution.cgroups import service_of
from egress_auditor.model import Attribution, Connection, Process

# A process whose start is this much after the event cannot have made it.
_START_SLACK_S = 0.5


@lru_cache(maxsize=1024)
def user_name(uid: int | None) -> str | None:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class ProcessResolver:
    def __init__(self, max_entries: int = 8192, ancestors: int = 2) -> None:
        self._cache: OrderedDict[tuple[int, float], Process] = OrderedDict()
        self._max = max_entries
        self._ancestors = ancestors

    def resolve(self, pid: int | None, comm: str, uid: int | None, at: float) -> Process:
        """The process `pid` as it was at time `at` (seconds since the epoch)."""
        found = self._lookup(pid, at, self._ancestors, comm)
        if found is not None:
            return found
        return Process(pid=pid, name=comm, uid=uid, user=user_name(uid), attribution=Attribution.NAME_ONLY)

    def _lookup(self, pid: int | None, at: float, ancestors: int, comm: str | None = None) -> Process | None:
        if not pid:  # unknown, or the kernel's idle task
            return None
        try:
            proc = psutil.Process(pid)
            started = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        if started > at + _START_SLACK_S:
            return None  # the PID now belongs to a later process
        key = (pid, started)
        cached = self._cache.get(key)
        # exec keeps pid and start time: a name unlike the kernel's comm means the entry is stale.
        if cached is not None and (comm is None or cached.name[:15] == comm[:15]):
            self._cache.move_to_end(key)
            return cached
        process = self._read(proc, started, ancestors)
        if process is None:
            return None
        self._cache[key] = process
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return process

    def _read(self, proc: psutil.Process, started: float, ancestors: int) -> Process | None:
        try:
            with proc.oneshot():
                name = proc.name()
                uid = proc.uids().real
                ppid = proc.ppid()
                try:
                    exe = proc.exe() or None
                    cmdline = tuple(proc.cmdline())
                except (psutil.AccessDenied, psutil.ZombieProcess):
                    exe, cmdline = None, ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        parent = self._lookup(ppid, started, ancestors - 1) if ancestors > 0 else None
        return Process(
            pid=proc.pid,
            name=name,
            uid=uid,
            user=user_name(uid),
            exe=exe,
            cmdline=cmdline,
            start_time=started,
            parent=parent,
            attribution=Attribution.PROC,
        )


class LineageLookup(Protocol):
    """What the attributor needs of lineage.ProcessTable (kept apart: lineage imports this module)."""

    def process(self, pid: int, at: float, uid: int | None = None, gid: int | None = None) -> Process | None: ...


class CgroupLookup(Protocol):
    def path(self, cgroup_id: int) -> str | None: ...


class Attributor:
    """Who made a connection: the kernel lineage when it saw the process run,
    else /proc read now, else the kernel's task name only; then the cgroup
    and the service or container it belongs to."""

    def __init__(
        self,
        lineage: LineageLookup | None = None,
        resolver: ProcessResolver | None = None,
        cgroups: CgroupLookup | None = None,
    ) -> None:
        self.lineage = lineage
        self.resolver = resolver or ProcessResolver()
        self.cgroups = cgroups

    def attribute(self, conn: Connection) -> Process:
        process = None
        if self.lineage is not None and conn.pid:
            process = self.lineage.process(conn.pid, conn.time, conn.uid, conn.gid)
        if process is None:
            process = self.resolver.resolve(conn.pid, conn.comm, conn.uid, conn.time)
            if process.attribution is Attribution.PROC and conn.process.attribution is Attribution.SOCKET:
                process = dataclasses.replace(process, attribution=Attribution.SOCKET)  # pid from a socket match
        cgroup = self.cgroups.path(conn.cgroup_id) if self.cgroups is not None and conn.cgroup_id else None
        if cgroup is not None:
            process = dataclasses.replace(process, cgroup=cgroup, service=service_of(cgroup))
        return process
