"""argv as the kernel lineage reads it (bpf/process.bpf.c), on both paths: from
the new image's stack at sched_process_exec (the default where the kernel has
bpf_task_pt_regs), and at syscalls:sys_enter_execve (older kernels), which this
kernel can also load. Real processes exec real programs; every check looks at
the exec events of the test's own processes only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_auditor.attribution.lineage import ARGS_CUT, ProcessEvent, ProcessTable
from egress_auditor.attribution.lineage_tracer import ARGS_FROM_STACK, ARGS_FROM_SYSCALLS, LineageTracer
from egress_auditor.host import doctor, facts

EXEC = 2  # EA_PROC_EXEC
ARGS_SIZE = 512  # EA_ARGS_SIZE
TRUE = "/bin/true"


class Recording(ProcessTable):
    """A process table that also keeps every exec event it is given, by pid."""

    def __init__(self) -> None:
        super().__init__()
        self.execs: dict[int, ProcessEvent] = {}

    def apply(self, event: ProcessEvent) -> None:
        if event.kind == EXEC:
            self.execs[event.pid] = event
        super().apply(event)


@pytest.fixture(scope="module", params=["stack", "syscalls"])
def lineage(request: pytest.FixtureRequest) -> Iterator[LineageTracer]:
    tracer = LineageTracer(Recording(), argv_from=request.param)
    tracer.open()
    yield tracer
    tracer.close()


def exec_of(tracer: LineageTracer, argv: list[str | bytes], **popen: object) -> ProcessEvent:
    """Run argv to its end; the exec event the kernel sent for it."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, **popen)  # type: ignore[call-overload]
    assert proc.wait(timeout=30) == 0
    table = tracer.table
    assert isinstance(table, Recording)
    deadline = time.monotonic() + 5
    while proc.pid not in table.execs and time.monotonic() < deadline:
        tracer.consume()
        time.sleep(0.01)
    assert proc.pid in table.execs, f"no exec event for pid {proc.pid}"
    return table.execs[proc.pid]


def test_the_stack_path_is_the_default_here_and_attaches_no_syscall_tracepoint() -> None:
    assert facts.kernel_has_helpers("get_current_task_btf", "task_pt_regs")
    assert not facts.kernel_has_helpers("task_pt_regs", "no_such_helper")
    (shown,) = [check for check in doctor.checks() if check.name.startswith("command lines read at exec")]
    assert shown.ok and "stack" in shown.detail and not shown.required  # what `egress-auditor doctor` shows
    with pytest.raises(ValueError, match="argv_from"):
        LineageTracer(argv_from="proc")
    for argv_from, expected in (("auto", ARGS_FROM_STACK), ("syscalls", ARGS_FROM_SYSCALLS)):
        tracer = LineageTracer(argv_from=argv_from)
        try:
            assert expected in tracer.open()
            listed = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, check=True).stdout
            listing = json.loads(listed)
            ours = {entry.get("tracepoint") for entry in listing if entry["pid"] == os.getpid()}
        finally:
            tracer.close()
        assert {"sched_process_exec", "sched_process_exit", "task_newtask"} <= ours
        # A syscall tracepoint puts every syscall of the host on the slow path: only the fallback has one.
        assert ("sys_enter_execve" in ours) is (argv_from == "syscalls"), ours


def test_words_come_back_exactly_whatever_they_hold(lineage: LineageTracer) -> None:
    words: list[str | bytes] = [TRUE, "two words", "", "new\nline", "\x1b[31mred", "héllo", b"\xff\xfe raw"]
    ev = exec_of(lineage, words)
    expected = tuple(w if isinstance(w, str) else w.decode("utf-8", "surrogateescape") for w in words)
    assert ev.args == expected
    assert ev.flags == 0 and ev.filename == TRUE


# A 32-bit program that exits at once: no C library needed (int 0x80, exit 0).
EXIT_AT_ONCE_32 = 'void _start(void) { __asm__ volatile("movl $1, %eax\\n movl $0, %ebx\\n int $0x80"); }\n'


@pytest.fixture(scope="module")
def program_32bit(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A static i386 executable, built by the machine's gcc (-m32 needs no 32-bit C library here)."""
    where = tmp_path_factory.mktemp("ia32")
    (where / "exit.c").write_text(EXIT_AT_ONCE_32)
    binary = where / "exit32"
    subprocess.run(["gcc", "-m32", "-nostdlib", "-static", "-o", str(binary), str(where / "exit.c")], check=True)
    assert binary.read_bytes()[4] == 1, "ELFCLASS32"
    binary.chmod(0o755)
    return str(binary)


def test_a_32_bit_process_words_come_back_exactly(lineage: LineageTracer, program_32bit: str) -> None:
    """On the stack path a 32-bit image's argv pointers are 4 bytes (its stack lies below 4 GiB)."""
    words: list[str | bytes] = [program_32bit, "two words", "", "new\nline", "\x1b[31mred", b"\xff\xfe raw"]
    ev = exec_of(lineage, words)
    expected = tuple(w if isinstance(w, str) else w.decode("utf-8", "surrogateescape") for w in words)
    assert ev.args == expected
    assert ev.flags == 0 and ev.filename == program_32bit
    long_word = "w" * 600  # cut at the buffer as for a 64-bit image
    ev = exec_of(lineage, [program_32bit, long_word])
    assert ev.flags & ARGS_CUT and ev.args == (program_32bit, long_word[: ARGS_SIZE - len(program_32bit) - 1])


def test_an_argv_longer_than_the_buffer_is_kept_up_to_it_and_marked_cut(lineage: LineageTracer) -> None:
    ev = exec_of(lineage, [TRUE, "a" * 100, "b" * 600, "c"])
    assert ev.flags & ARGS_CUT
    assert ev.args[:2] == (TRUE, "a" * 100)
    assert ev.args[2] == "b" * (ARGS_SIZE - len(TRUE) - 1 - 101)  # up to the end of the buffer


def test_an_argv_that_fills_the_buffer_exactly_is_not_cut(lineage: LineageTracer) -> None:
    last = "z" * (ARGS_SIZE - len(TRUE) - 1 - 1)  # both words and their NULs: 512 bytes
    ev = exec_of(lineage, [TRUE, last])
    assert ev.args == (TRUE, last) and ev.flags == 0


def test_many_short_words(lineage: LineageTracer) -> None:
    words = [TRUE, *(str(i) for i in range(40))]
    ev = exec_of(lineage, words)
    if lineage.argv_from == "syscalls":  # execve's argv is read word by word, at most 32 of them
        assert ev.args == tuple(words[:32]) and ev.flags & ARGS_CUT
    else:  # the stack holds argv in one piece: every word that fits
        assert ev.args == tuple(words) and ev.flags == 0


def test_a_script_is_seen_as_its_interpreter_runs_it_from_the_stack(lineage: LineageTracer, tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    script.chmod(0o755)
    ev = exec_of(lineage, [str(script), "arg"])
    if lineage.argv_from == "syscalls":  # what the caller passed to execve
        assert ev.args == (str(script), "arg")
    else:  # what the new image got, as /proc/PID/cmdline shows it
        assert ev.args == ("/bin/sh", str(script), "arg")


def test_a_thread_that_execs_gives_the_process_its_new_argv(lineage: LineageTracer) -> None:
    code = "import os,threading; threading.Thread(target=os.execv, args=(sys.argv[1], sys.argv[1:])).start()"
    ev = exec_of(lineage, [sys.executable, "-c", "import sys;" + code, TRUE, "from-thread"])
    assert ev.args == (TRUE, "from-thread") and ev.flags == 0
