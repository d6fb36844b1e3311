"""The kernel side of process lineage: bpf/process.bpf.c through BCC, its fork,
exec and exit records applied to a `ProcessTable` (lineage.py), and the table
seeded from /proc once the program is attached, for the processes that started
before it."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any

import psutil

from egress_auditor.attribution.lineage import PROC_EXEC, Image, Life, ProcessEvent, ProcessTable
from egress_auditor.errors import AuditorError
from egress_auditor.host import facts
from egress_auditor.host.compiler import bpf_source_dir, compile_bpf, compile_unit

# The values below repeat bpf/events.h (EA_PSTAT_*); tests/unit/test_events_header.py checks them.
PSTAT_EVENTS, PSTAT_LOST = 0, 1
NEEDED = (("sched", "sched_process_exec"), ("sched", "sched_process_exit"))
# argv from the stack needs bpf_task_pt_regs (5.15+): execve's tracepoints slow every syscall of the host.
ARGS_FROM_STACK = "argv from the new image's stack"
ARGS_FROM_SYSCALLS = "argv at syscalls:sys_enter_execve{,at}"


def seed_from_proc(table: ProcessTable) -> int:
    """Every running process, read now from /proc: the table's starting point."""
    seeded: list[tuple[Life, int]] = []
    for pid in psutil.pids():
        # Taken before the read: kernel events after it are applied, none is lost in between.
        read_ns = time.monotonic_ns()
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                created, ppid, name, uids, gids = (
                    proc.create_time(),
                    proc.ppid(),
                    proc.name(),
                    proc.uids(),
                    proc.gids(),
                )
                try:
                    exe, cmdline = proc.exe() or None, tuple(proc.cmdline())
                except (psutil.AccessDenied, psutil.ZombieProcess):
                    exe, cmdline = None, ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        start_ns = min(table.to_ns(created), read_ns)
        image = Image(start_ns, name, exe, cmdline)
        life = Life(pid, start_ns, None, uids.real, gids.real, 0, [image], seeded_ns=read_ns)
        seeded.append((life, ppid))
    table.seed(seeded)
    return len(seeded)


def tracepoint_fields(category: str, event: str) -> set[str]:
    """Field names of a tracepoint, from its tracefs format (empty if absent)."""
    root = facts.tracefs()
    if root is None:
        return set()
    try:
        text = (root / "events" / category / event / "format").read_text()
    except OSError:
        return set()
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("field:"):
            declaration = line[len("field:") :].split(";", 1)[0]
            names.add(declaration.split()[-1].split("[", 1)[0])
    return names


class LineageTracer:
    """bpf/process.bpf.c through BCC, feeding a ProcessTable."""

    name = "lineage"

    def __init__(self, table: ProcessTable | None = None, pages: int = 256, argv_from: str = "auto") -> None:
        if argv_from not in ("auto", "stack", "syscalls"):
            raise ValueError(f"argv_from: auto, stack or syscalls, not {argv_from!r}")
        self.table = table if table is not None else ProcessTable()  # an empty table is falsy
        self.pages = pages
        self.argv_from = argv_from  # auto: from the stack where the kernel allows it
        self.bpf: Any = None
        self.seeded = 0
        self._lost_seen = 0
        self._args_offset = 0

    def open(self) -> str:
        """Load and attach, then seed from /proc; returns what is attached."""
        problem = facts.environment_problem()
        if problem:
            raise AuditorError(problem)
        missing = [f"{c}:{e}" for c, e in NEEDED if not facts.tracepoint_exists(c, e)]
        if missing:
            raise AuditorError(f"process lineage needs tracepoints {', '.join(missing)} (mount tracefs)")
        src = bpf_source_dir()
        cflags = [f"-I{src}", f"-DEA_LINEAGE_PAGES={self.pages}"]
        fork_hook = "task:task_newtask"
        if not facts.tracepoint_exists("task", "task_newtask"):
            cflags.append("-DEA_FORK_SCHED")
            fork_hook = "sched:sched_process_fork"
        if "group_dead" not in tracepoint_fields("sched", "sched_process_exit"):
            cflags.append("-DEA_EXIT_LEADER")
        args_from = self._load(src, cflags)
        self.seeded = seed_from_proc(self.table)
        self.consume()
        return f"{fork_hook}, sched:sched_process_exec/exit, {args_from}; {self.seeded} processes seeded"

    def _load(self, src: Path, cflags: list[str]) -> str:
        """Load and attach process.bpf.c, reading argv from the stack where the kernel allows it."""
        args_from = ARGS_FROM_STACK
        stack = self.argv_from == "stack" or (
            self.argv_from == "auto" and facts.kernel_has_helpers("get_current_task_btf", "task_pt_regs")
        )
        if not stack:
            if not facts.tracepoint_exists("syscalls", "sys_enter_execve"):
                raise AuditorError(
                    "process lineage needs bpf_task_pt_regs (5.15+, with BTF) or syscalls:sys_enter_execve"
                )
            args_from = ARGS_FROM_SYSCALLS
            cflags = [*cflags, "-DEA_EXEC_ARGS_SYSCALLS"]
        try:
            self.bpf = compile_bpf(compile_unit(("process.bpf.c",), src), cflags)
            self.bpf[b"lineage_events"].open_ring_buffer(self._on_event)
        except Exception as exc:  # BCC raises bare Exception for compile and attach failures
            self.close()
            raise AuditorError(f"could not load the process lineage program: {exc}") from exc
        return args_from

    def _on_event(self, _ctx: Any, data: Any, size: int) -> None:
        raw = self.bpf[b"lineage_events"].event(data)
        kind = raw.kind
        filename, args = "", ()
        if kind == PROC_EXEC:  # only EXEC records carry the name and argv: the others end before them
            if not self._args_offset:
                self._args_offset = type(raw).args.offset
            filename = raw.filename.decode("utf-8", "surrogateescape")
            blob = ctypes.string_at(ctypes.addressof(raw) + self._args_offset, min(raw.args_size, size))
            args = tuple(w.decode("utf-8", "surrogateescape") for w in blob.split(b"\0")[: raw.argc])
        self.table.apply(
            ProcessEvent(
                kind=kind,
                ts_ns=raw.ts_ns,
                pid=raw.pid,
                tid=raw.tid,
                ppid=raw.ppid,
                uid=raw.uid,
                gid=raw.gid,
                cgroup_id=raw.cgroup_id,
                clone_flags=raw.clone_flags,
                comm=raw.comm.decode("utf-8", "surrogateescape"),
                filename=filename,
                args=args,
                flags=raw.flags,
            )
        )

    def consume(self) -> None:
        """Apply every event the kernel has written so far."""
        if self.bpf is None:
            return
        self.bpf.ring_buffer_consume()
        lost = self.lost()
        if lost != self._lost_seen:
            self._lost_seen = lost
            self.table.mark_loss()

    def _stat(self, slot: int) -> int:
        return int(self.bpf[b"lineage_stats"].sum(slot).value) if self.bpf is not None else 0

    def lost(self) -> int:
        return self._stat(PSTAT_LOST)

    def events(self) -> int:
        return self._stat(PSTAT_EVENTS)

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
