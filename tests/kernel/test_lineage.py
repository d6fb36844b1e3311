"""Kernel process lineage (bpf/process.bpf.c, lineage_tracer.py, lineage.py) with the real eBPF
input: processes that are gone before user space looks, a renamed thread,
a reused PID, a cgroup made by the test. Connections go to closed ports on
the loopback of a namespace of the test's own (the kernel answers RST), and
every check filters on the test's own ports: other tests may run alongside."""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Namespace

from egress_auditor.attribution.cgroups import CgroupResolver, cgroup2_mount
from egress_auditor.attribution.lineage_tracer import LineageTracer
from egress_auditor.attribution.process import Attributor, ProcessResolver
from egress_auditor.model import Attribution, Connection, Process, Transport
from egress_auditor.plugins import select

PYTHON = "/usr/bin/python3"
CONNECT = "import socket,sys; socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1])))"
# The connecting thread names itself as a browser's network thread does.
THREAD = (
    "import ctypes,socket,sys,threading\n"
    "def work():\n"
    "    ctypes.CDLL(None).prctl(15, b'Socket Thread', 0, 0, 0)\n"
    "    socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1])))\n"
    "t = threading.Thread(target=work); t.start(); t.join()\n"
)
# Forks until the child gets pid argv[1] (ns_last_pid), which then execs argv[2:].
AT_PID = (
    "import os,sys\n"
    "target = int(sys.argv[1])\n"
    "for _ in range(500):\n"
    "    with open('/proc/sys/kernel/ns_last_pid', 'w') as f: f.write(str(target - 1))\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        if os.getpid() == target: os.execv(sys.argv[2], sys.argv[2:])\n"
    "        os._exit(0)\n"
    "    os.waitpid(pid, 0)\n"
    "    if pid == target: sys.exit(0)\n"
    "sys.exit(3)\n"
)


class Collector:
    """The trace loop's order: poll connections, apply lineage, then attribute."""

    def __init__(self) -> None:
        self.input = select("input", ["ebpf"], [], default="ebpf").create()[0]
        self.lineage = LineageTracer()
        self.cgroups = CgroupResolver()
        self.resolver = ProcessResolver()
        self.attributor = Attributor(self.lineage.table, self.resolver, self.cgroups)

    def open(self) -> None:
        self.input.open()
        self.lineage.open()

    def collect(self, ports: set[int], timeout: float = 15.0) -> dict[int, tuple[Connection, Process]]:
        found: dict[int, tuple[Connection, Process]] = {}
        deadline = time.monotonic() + timeout
        while set(found) != ports and time.monotonic() < deadline:
            queued: list[Connection] = []
            self.input.poll(0.05, queued.append)
            self.lineage.consume()
            for conn in queued:
                if conn.protocol is Transport.TCP and conn.dport in ports and str(conn.dst) == "127.0.0.1":
                    found[conn.dport] = (conn, self.attributor.attribute(conn))
        assert set(found) == ports, f"connections to {sorted(ports - set(found))} never arrived"
        return found

    def close(self) -> None:
        self.input.close()
        self.lineage.close()
        self.cgroups.close()


@pytest.fixture(scope="module")
def tracer() -> Iterator[Collector]:
    collector = Collector()
    collector.open()
    yield collector
    collector.close()


@pytest.fixture
def ports() -> Iterator[Iterator[int]]:
    # Fresh ports per test: the kernel counts repeats of a flow without an event.
    yield iter(random.sample(range(20000, 60000), 50))


def test_processes_that_exit_right_after_connecting_are_named_in_full(
    tracer: Collector, client_ns: Namespace, ports: Iterator[int]
) -> None:
    runs = {}
    for shape in ("direct", "exec", "fork") * 4:
        port, token = next(ports), secrets.token_hex(4)
        argv = [PYTHON, "-c", CONNECT, str(port), token]
        if shape == "exec":  # a shell that execs the client: the same pid runs two programs
            argv = ["sh", "-c", f'exec {PYTHON} -c "$0" {port} {token}', CONNECT]
        elif shape == "fork":  # a shell that forks it: the shell is the parent
            argv = ["sh", "-c", f'{PYTHON} -c "$0" {port} {token}; true', CONNECT]
        proc = client_ns.popen(argv)
        assert proc.wait(timeout=30) == 0
        runs[port] = (shape, proc.pid, token)
    found = tracer.collect(set(runs))
    for port, (shape, pid, token) in runs.items():
        conn, process = found[port]
        assert process.attribution is Attribution.KERNEL, (shape, process)
        assert (process.name, process.exe) == ("python3", PYTHON)
        assert process.cmdline == (PYTHON, "-c", CONNECT, str(port), token)
        assert process.uid == 0 and process.user == "root"
        assert process.parent is not None and process.parent.parent is not None
        if shape == "fork":
            assert process.parent.name == "sh" and process.parent.pid == pid
            assert process.parent.parent.pid == os.getpid()
        else:
            assert conn.pid == pid  # ip netns exec and sh both exec in place
            assert process.parent.pid == os.getpid()
        # /proc at event time has nothing left to read: only the kernel's name.
        late = tracer.resolver.resolve(conn.pid, conn.comm, conn.uid, conn.time)
        assert late.attribution is Attribution.NAME_ONLY and late.exe is None


def test_a_renamed_thread_is_reported_under_its_process_name(
    tracer: Collector, client_ns: Namespace, ports: Iterator[int]
) -> None:
    port = next(ports)
    proc = client_ns.popen([PYTHON, "-c", THREAD, str(port)])
    assert proc.wait(timeout=30) == 0
    conn, process = tracer.collect({port})[port]
    assert conn.comm == "Socket Thread"  # the thread's name, kept as a detail
    assert conn.tid != conn.pid == proc.pid
    assert process.name == "python3" and process.exe == PYTHON
    assert process.attribution is Attribution.KERNEL


def test_a_reused_pid_keeps_each_process_its_own_identity(
    tracer: Collector, client_ns: Namespace, ports: Iterator[int]
) -> None:
    first_port, second_port = next(ports), next(ports)
    first = client_ns.popen([PYTHON, "-c", CONNECT, str(first_port), "first"])
    assert first.wait(timeout=30) == 0
    # The second process takes the first one's pid and stays alive while attribution runs.
    waiter = CONNECT + "; sys.stdin.read()"
    launcher = client_ns.popen(
        [PYTHON, "-c", AT_PID, str(first.pid), PYTHON, "-c", waiter, str(second_port), "second"],
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not _runs(first.pid, "second") and time.monotonic() < deadline:
            assert launcher.poll() in (None, 0), "could not get the pid back"
            time.sleep(0.02)
        assert _runs(first.pid, "second")
        found = tracer.collect({first_port, second_port})
        (conn_a, a), (conn_b, b) = found[first_port], found[second_port]
        assert conn_a.pid == conn_b.pid == first.pid
        assert a.cmdline[-1] == "first" and b.cmdline[-1] == "second"
        assert a.start_time is not None and b.start_time is not None and a.start_time < b.start_time
        assert a.attribution is b.attribution is Attribution.KERNEL
        # /proc now shows the second process: read late, it cannot name the first one.
        late = tracer.resolver.resolve(conn_a.pid, conn_a.comm, conn_a.uid, conn_a.time)
        assert late.cmdline[-1:] != ("first",)
    finally:
        launcher.stdin.close()
        launcher.wait(timeout=30)


def _runs(pid: int, token: str) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2] == token.encode()
    except (OSError, IndexError):
        return False


def test_a_process_in_a_cgroup_the_test_made_gets_its_path_and_service(
    tracer: Collector, client_ns: Namespace, ports: Iterator[int]
) -> None:
    root = cgroup2_mount()
    assert root is not None, "no cgroup v2 hierarchy"
    tag = secrets.token_hex(3)
    slice_dir = root / f"ea-test-{tag}.slice"
    unit = slice_dir / f"demo-{tag}.service"
    unit.mkdir(parents=True)
    try:
        port = next(ports)

        def join() -> None:
            (unit / "cgroup.procs").write_text("0\n")

        proc = client_ns.popen([PYTHON, "-c", CONNECT, str(port)], preexec_fn=join)
        assert proc.wait(timeout=30) == 0
        conn, process = tracer.collect({port})[port]
        assert conn.cgroup_id == os.stat(unit).st_ino
        assert process.cgroup == f"/ea-test-{tag}.slice/demo-{tag}.service"
        assert process.service == f"demo-{tag}.service"
        assert process.attribution is Attribution.KERNEL
    finally:
        for directory in (unit, slice_dir):
            for _ in range(100):
                try:
                    directory.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)  # the exited client is released a moment later
