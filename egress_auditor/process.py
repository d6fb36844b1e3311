"""Process attribution: who made a connection, read from /proc when it arrives.

Lookups are cached by (pid, start time) so a reused PID never takes another
process's identity, and the cache is bounded.
"""

from __future__ import annotations

import pwd
from collections import OrderedDict
from functools import lru_cache

import psutil

from egress_auditor.model import Attribution, Process

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

    def resolve(self, pid: int, comm: str, uid: int | None, at: float) -> Process:
        """The process `pid` as it was at time `at` (seconds since the epoch)."""
        found = self._lookup(pid, at, self._ancestors, comm)
        if found is not None:
            return found
        return Process(pid=pid, name=comm, uid=uid, user=user_name(uid), attribution=Attribution.NAME_ONLY)

    def _lookup(self, pid: int, at: float, ancestors: int, comm: str | None = None) -> Process | None:
        if pid <= 0:
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
