"""Process lineage: who each process is, recorded as the kernel forks, execs
and reaps it (bpf/process.bpf.c), so a process that lived a millisecond, or
whose PID is already reused, is still named right.

`ProcessTable` holds one `Life` per process lifetime, keyed by (pid, start):
a reused PID starts a new life and never inherits the old one's identity.
Each life keeps the images (exe, command line) it ran, with the time each
began, so a connection is given the image in effect when it was made. The
table is bounded: exited lives go first. It loads no program and reads no
/proc: `LineageTracer` (lineage_tracer.py) loads bpf/process.bpf.c, feeds the
table its events, and seeds it from /proc at start-up.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from egress_auditor.attribution.process import user_name
from egress_auditor.model import Attribution, Process

# The values below repeat bpf/events.h (EA_PROC_*); tests/unit/test_events_header.py checks them.
PROC_FORK, PROC_EXEC, PROC_EXIT = 1, 2, 3
ARGS_CUT, ARGS_MISSING = 1, 2
CLONE_PARENT = 0x00008000
COMM_LEN = 15  # the kernel keeps 15 bytes of a task name
IMAGES_KEPT = 4  # execs remembered per life: enough for shell -> exec chains
# Clocks of two events compared across CPUs, and times converted through floats, agree to well under this.
SLACK_NS = 1_000_000

Key = tuple[int, int]  # (pid, start in CLOCK_MONOTONIC ns)


@dataclass(frozen=True)
class ProcessEvent:
    """A fork, exec or exit as the kernel reported it (times in CLOCK_MONOTONIC ns)."""

    kind: int
    ts_ns: int
    pid: int
    tid: int = 0
    ppid: int = 0
    uid: int = 0
    gid: int = 0
    cgroup_id: int = 0
    clone_flags: int = 0
    comm: str = ""
    filename: str = ""
    args: tuple[str, ...] = ()
    flags: int = 0


@dataclass(frozen=True)
class Image:
    """What a process runs: set by exec, inherited across fork."""

    since_ns: int
    name: str
    exe: str | None
    cmdline: tuple[str, ...]
    args_cut: bool = False


@dataclass
class Life:
    """One process from fork (or first sight) to exit."""

    pid: int
    start_ns: int
    parent: Key | None
    uid: int
    gid: int
    cgroup_id: int
    images: list[Image]
    exit_ns: int | None = None
    seeded_ns: int | None = None  # when /proc was read for it, if seeded
    epoch: int = 0  # loss epoch of its last update: older than the table's means events may be missing

    @property
    def key(self) -> Key:
        return (self.pid, self.start_ns)

    def image_at(self, at_ns: int) -> Image | None:
        for image in reversed(self.images):
            if image.since_ns <= at_ns:
                return image
        return self.images[0] if self.images else None


def process_name(comm: str, filename: str) -> str:
    """The program's name: the exec'd file's base name when the 15-byte comm is a cut of it."""
    base = filename.rsplit("/", 1)[-1]
    if len(comm) >= COMM_LEN and base.startswith(comm):
        return base
    return comm or base


@dataclass
class ProcessTable:
    """Lives by pid, newest last; bounded to `max_lives`, exited lives evicted first."""

    max_lives: int = 32768
    epoch_offset: float = field(default_factory=lambda: time.time() - time.monotonic())
    evicted: int = 0

    def __post_init__(self) -> None:
        self._lives: dict[int, list[Life]] = {}
        self._live: OrderedDict[Key, Life] = OrderedDict()
        self._exited: OrderedDict[Key, Life] = OrderedDict()
        self._epoch = 0

    def __len__(self) -> int:
        return len(self._live) + len(self._exited)

    # -- clocks ------------------------------------------------------------
    def to_ns(self, epoch_seconds: float) -> int:
        return int((epoch_seconds - self.epoch_offset) * 1e9)

    def to_epoch(self, ns: int) -> float:
        return ns / 1e9 + self.epoch_offset

    # -- lookups -----------------------------------------------------------
    def find(self, pid: int, at_ns: int) -> Life | None:
        """The life of `pid` that was running at `at_ns`, if the table saw it."""
        for life in reversed(self._lives.get(pid, ())):
            if life.start_ns <= at_ns + SLACK_NS:
                if life.exit_ns is not None and life.exit_ns + SLACK_NS < at_ns:
                    return None  # that life was over: the one at at_ns was never seen
                return life
        return None

    def current(self, pid: int) -> Life | None:
        lives = self._lives.get(pid)
        if lives and lives[-1].exit_ns is None:
            return lives[-1]
        return None

    def get(self, key: Key) -> Life | None:
        for life in self._lives.get(key[0], ()):
            if life.start_ns == key[1]:
                return life
        return None

    def is_stale(self, life: Life) -> bool:
        """Events were lost after this life's last update: it may be missing an exec."""
        return life.epoch < self._epoch

    def process(self, pid: int, at: float, uid: int | None = None, gid: int | None = None) -> Process | None:
        """The process `pid` as it was at `at` (seconds since the epoch), with
        parent and grandparent; None when the table did not see it run then."""
        life = self.find(pid, self.to_ns(at))
        if life is None or self.is_stale(life):
            return None
        if life.key in self._live:
            self._live.move_to_end(life.key)  # looked up: keep it over idle lives
        return self._build(life, self.to_ns(at), uid, gid, ancestors=2)

    def _build(self, life: Life, at_ns: int, uid: int | None, gid: int | None, ancestors: int) -> Process | None:
        image = life.image_at(at_ns)
        if image is None:
            return None
        parent = None
        if ancestors > 0 and life.parent is not None:
            parent_life = self.get(life.parent)
            if parent_life is not None:
                # The parent as it was when it started this process.
                parent = self._build(parent_life, life.start_ns, None, None, ancestors - 1)
        real_uid = life.uid if uid is None else uid
        return Process(
            pid=life.pid,
            name=image.name,
            uid=real_uid,
            user=user_name(real_uid),
            exe=image.exe,
            cmdline=image.cmdline,
            start_time=self.to_epoch(life.start_ns),
            parent=parent,
            attribution=Attribution.KERNEL,
            gid=life.gid if gid is None else gid,
        )

    # -- updates -----------------------------------------------------------
    def mark_loss(self) -> None:
        """Events were lost: every life updated so far may be incomplete."""
        self._epoch += 1

    def apply(self, event: ProcessEvent) -> None:
        if event.kind == PROC_FORK:
            self._fork(event)
        elif event.kind == PROC_EXEC:
            self._exec(event)
        elif event.kind == PROC_EXIT:
            self._exit(event)

    def _fork(self, ev: ProcessEvent) -> None:
        parent = self.find(ev.ppid, ev.ts_ns)
        if parent is not None and ev.clone_flags & CLONE_PARENT and parent.parent is not None:
            parent = self.get(parent.parent)  # CLONE_PARENT: a sibling of the caller
        known = self.current(ev.pid)
        if known is not None and known.seeded_ns is not None and known.seeded_ns > ev.ts_ns:
            # Seeded from /proc after this fork: the same process; the kernel's start and parent are exact.
            self._rekey(known, ev.ts_ns)
            known.parent = parent.key if parent is not None else known.parent
            return
        if known is not None:
            self._end(known, ev.ts_ns)  # its exit was never seen (lost, or a thread under EA_FORK_SCHED)
        inherited = parent.image_at(ev.ts_ns) if parent is not None else None
        image = (
            Image(ev.ts_ns, inherited.name, inherited.exe, inherited.cmdline, inherited.args_cut)
            if inherited is not None
            else Image(ev.ts_ns, ev.comm, None, ())
        )
        self._add(
            Life(
                pid=ev.pid,
                start_ns=ev.ts_ns,
                parent=parent.key if parent is not None else None,
                uid=ev.uid,
                gid=ev.gid,
                cgroup_id=ev.cgroup_id,
                images=[image],
                epoch=self._epoch,
            )
        )

    def _exec(self, ev: ProcessEvent) -> None:
        life = self.current(ev.pid)
        if life is not None and life.seeded_ns is not None and life.seeded_ns > ev.ts_ns:
            return  # /proc was read after this exec: the seed already shows it
        # argv unreadable part-way (paged out): keep what was read, marked as cut.
        cut = bool(ev.flags & (ARGS_CUT | ARGS_MISSING))
        image = Image(ev.ts_ns, process_name(ev.comm, ev.filename), ev.filename or None, ev.args, cut)
        if life is None:
            # Its fork was not seen (lost, or before start-up and missed by the seed).
            self._add(Life(ev.pid, ev.ts_ns, None, ev.uid, ev.gid, ev.cgroup_id, [image], epoch=self._epoch))
            return
        life.images.append(image)
        del life.images[:-IMAGES_KEPT]
        life.uid, life.gid, life.cgroup_id = ev.uid, ev.gid, ev.cgroup_id
        life.epoch = self._epoch

    def _exit(self, ev: ProcessEvent) -> None:
        life = self.current(ev.pid)
        if life is not None:
            self._end(life, ev.ts_ns)

    def seed(self, lives: Iterable[tuple[Life, int]]) -> None:
        """Add processes read from /proc: (life, parent pid); parents are linked afterwards."""
        pending: list[tuple[Life, int]] = []
        for life, ppid in lives:
            if self.current(life.pid) is not None:
                continue  # the kernel already reported it: its events are exact
            life.epoch = self._epoch
            self._add(life)
            pending.append((life, ppid))
        for life, ppid in pending:
            parent = self.current(ppid)
            life.parent = parent.key if parent is not None else None

    # -- bookkeeping ---------------------------------------------------------
    def _add(self, life: Life) -> None:
        self._lives.setdefault(life.pid, []).append(life)
        self._live[life.key] = life
        while len(self) > self.max_lives:
            self._evict()

    def _end(self, life: Life, at_ns: int) -> None:
        life.exit_ns = at_ns
        self._live.pop(life.key, None)
        self._exited[life.key] = life

    def _rekey(self, life: Life, start_ns: int) -> None:
        self._live.pop(life.key, None)
        life.start_ns = start_ns
        life.images[0] = dataclasses.replace(life.images[0], since_ns=start_ns)
        self._live[life.key] = life

    def _evict(self) -> None:
        store = self._exited if self._exited else self._live
        key, life = store.popitem(last=False)
        lives = self._lives[key[0]]
        lives.remove(life)
        if not lives:
            del self._lives[key[0]]
        self.evicted += 1


__all__ = ["Image", "Life", "ProcessEvent", "ProcessTable", "process_name"]
