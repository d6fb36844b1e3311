"""Inside a VM booting one of Debian's stock kernels (scripts/vm_test.py): the kprobe path and the
others that kernel offers, end to end, with BCC compiling against that kernel's own headers.

The VM is this test's alone: clients connect over its loopback, without namespaces. One tracer
start costs about 80 s under emulation, so each attach path starts once (a module fixture) and
every check of that path reads the same run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egress_auditor.host.facts import fentry_usable

EGRESS_AUDITOR = Path(sys.executable).with_name("egress-auditor")
RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
STARTUP_S = 420.0  # BCC compiles and attaches in about 80 s under TCG; a loaded host doubles that
KERNEL = os.uname().release

# The tool's own stderr lines; anything else (a compiler warning, a library's note) is noise.
OWN_LINE = re.compile(r"^(egress-auditor(:| is running)|new (TCP|UDP) (connection|destination) )")

# One connect or datagram per argument: "tcp HOST PORT", "udp HOST PORT" (sendto), "cudp HOST PORT"
# (connect, then send).
CLIENT = textwrap.dedent(
    r"""
    import socket, sys
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if kind == "tcp":  # a refused connect is a connect all the same
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect_ex((host, port))
    else:
        s = socket.socket(family, socket.SOCK_DGRAM)
        if kind == "udp":
            s.sendto(b"x", (host, port))
        else:
            s.connect((host, port))
            s.send(b"x")
    s.close()
    """
)


def client_argv(kind: str, host: str, port: int) -> list[str]:
    if kind == "blink":  # the short-lived C client: host is its path
        return [host, "127.0.0.1", str(port)]
    if kind == "dns":  # a name asked of the test's DNS server, then a connect to its answer
        return [sys.executable, "-c", DNS_CLIENT, host, str(port)]
    return [sys.executable, "-c", CLIENT, kind, host, str(port)]


DNS_CLIENT = textwrap.dedent(
    r"""
    import socket, sys
    import dns.message, dns.query
    answer = dns.query.udp(dns.message.make_query(sys.argv[1], "A"), "127.0.0.1", timeout=10)
    address = answer.answer[0][0].address
    socket.socket().connect_ex((address, int(sys.argv[2])))
    """
)

# Connects once and exits: a process that lives about a millisecond, gone before user space looks.
BLINK_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    connect(s, (struct sockaddr *)&a, sizeof a);
    return 0;
}
"""


def tail(lines: Sequence[str], count: int = 40) -> str:
    return "\n".join(lines[-count:])


@dataclass
class Run:
    """A finished tracer: its exit status, stderr lines, JSON flow records, and the clients' pids."""

    returncode: int
    stderr: list[str]
    flows: list[dict]
    clients: dict[tuple[str, str, int], int]  # (kind, host, port) -> pid

    def flow(self, protocol: str, host: str, port: int) -> dict | None:
        return next(
            (f for f in self.flows if f["protocol"] == protocol and f["dst"] == host and f["dport"] == port), None
        )

    @property
    def attached(self) -> str:
        return next((line for line in self.stderr if "ebpf input attached:" in line), "")


_finished: dict[tuple[str, ...], Run | str] = {}


def trace_once(options: Sequence[str], *args: Any, **kwargs: Any) -> Run:
    """trace(), whose failure is kept: pytest sets a failed module fixture up again for each test
    that uses it, and a start costs 80 s or more here."""
    key = tuple(options)
    if key not in _finished:
        try:
            _finished[key] = trace(options, *args, **kwargs)
        except AssertionError as exc:
            _finished[key] = str(exc)
    result = _finished[key]
    if isinstance(result, str):
        pytest.fail(f"(this tracer run failed once already) {result}", pytrace=False)
    return result


def trace(
    options: Sequence[str],
    traffic: Sequence[tuple[str, str, int]],
    command: Sequence[str] = (),
    go: Path | None = None,
    wait_s: float = 120,
) -> Run:
    """Start the tracer, wait for its running line, run one client per traffic item, then stop it
    (SIGINT), or with a command, let it end when the command does."""
    argv = [str(EGRESS_AUDITOR), "trace", "--no-live", "-o", "json", *options, *(("--", *command) if command else ())]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    running = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr.append(line.rstrip("\n"))
            if line.rstrip("\n") == RUNNING_LINE:
                running.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_S
        while not running.wait(0.5):
            assert proc.poll() is None, f"exited early ({proc.returncode}): {tail(stderr)}"
            assert time.monotonic() < deadline, f"no running line after {STARTUP_S}s: {tail(stderr)}"
        clients = {}
        for kind, host, port in traffic:
            client = subprocess.Popen(client_argv(kind, host, port))
            assert client.wait(timeout=60) == 0, f"client {kind} {host} {port} failed"
            clients[(kind, host, port)] = client.pid
        if go is not None:
            go.touch()  # the command starts its traffic now
        if not command:
            time.sleep(2)  # the event buffer is polled at least every second
            proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=wait_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    flows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return Run(proc.returncode, stderr, [f for f in flows if f.get("type") == "flow"], clients)


@pytest.fixture(scope="module")
def listeners() -> Iterator[dict[str, int]]:
    """TCP listeners on 127.0.0.1 and ::1 (connects complete without accept), their ports by host."""
    socks = []
    ports = {}
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((host, 0))
        s.listen(64)
        socks.append(s)
        ports[host] = s.getsockname()[1]
    yield ports
    for s in socks:
        s.close()


def test_doctor_finds_kprobes_and_headers() -> None:
    out = subprocess.run([str(EGRESS_AUDITOR), "doctor"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if line.count("│") >= 4}
    assert "ok" in rows["kprobes"], out.stdout
    assert "ok" in rows["fentry (BPF trampolines)"], out.stdout
    assert f"/lib/modules/{KERNEL}/build" in rows["kernel headers"], out.stdout


# Ports of the UDP destinations: nothing listens there, which a datagram does not need.
UDP4, UDP6, CUDP4, CUDP6 = 29101, 29102, 29103, 29104
DNS_NAME, DNS_PORT = "vm.example.test", 29105  # the DNS client connects there (refused: a connect all the same)
BLINK_PORT = 29106


@pytest.fixture(scope="module")
def dns_server() -> Iterator[None]:
    """Answers every A question with 127.0.0.1, on 127.0.0.1:53 (the VM's own port, free there)."""
    import dns.message
    import dns.rrset

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))

    def serve() -> None:
        while True:
            try:
                wire, peer = sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(wire)
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "127.0.0.1"))
            sock.sendto(response.to_wire(), peer)

    threading.Thread(target=serve, daemon=True).start()
    yield
    sock.close()


@pytest.fixture(scope="module")
def blink(tmp_path_factory: pytest.TempPathFactory) -> str:
    where = tmp_path_factory.mktemp("blink")
    (where / "blink.c").write_text(BLINK_C)
    subprocess.run(["gcc", "-O2", "-static", "-o", str(where / "blink"), str(where / "blink.c")], check=True)
    return str(where / "blink")


def common_traffic(listeners: dict[str, int]) -> list[tuple[str, str, int]]:
    return [
        ("tcp", "127.0.0.1", listeners["127.0.0.1"]),
        ("tcp", "::1", listeners["::1"]),
        ("udp", "127.0.0.1", UDP4),
        ("udp", "::1", UDP6),
        ("cudp", "127.0.0.1", CUDP4),
        ("cudp", "::1", CUDP6),
    ]


@pytest.fixture(scope="module")
def auto_run(listeners: dict[str, int], dns_server: None, blink: str) -> Run:
    """auto: the cheapest TCP path that loads (the cgroup hooks), cgroup hooks for UDP, DNS names,
    the ring buffer, kernel lineage."""
    traffic = [*common_traffic(listeners), ("dns", DNS_NAME, DNS_PORT), ("blink", blink, BLINK_PORT)]
    return trace_once(["-I", "ebpf:dns:on"], traffic)


@pytest.fixture(scope="module")
def kprobe_run(listeners: dict[str, int]) -> Run:
    # Without lineage: its compile would double this start, and auto_run checks it.
    return trace_once(["-I", "ebpf:probe:kprobe", "--no-lineage"], common_traffic(listeners))


def test_auto_takes_the_cgroup_hooks(auto_run: Run) -> None:
    """The cheapest path per connect (docs/benchmarks.md), though these kernels have kprobes and fentry."""
    assert auto_run.returncode == 0, tail(auto_run.stderr)
    assert "TCP: cgroup connect4/6 hooks" in auto_run.attached, tail(auto_run.stderr)
    assert "ring buffer" in auto_run.attached, auto_run.attached


def test_fentry_loads(command_run: Run) -> None:
    """Debian's kernels allow BPF trampolines (this machine's kernel refuses them)."""
    usable, why = fentry_usable()
    assert usable, f"the kernel refuses fentry: {why}"
    assert "fentry tcp_v4_connect/tcp_v6_connect" in command_run.attached, tail(command_run.stderr)


def test_kprobes_attach(kprobe_run: Run) -> None:
    assert kprobe_run.returncode == 0, tail(kprobe_run.stderr)
    assert "kprobes tcp_v4_connect/tcp_v6_connect" in kprobe_run.attached, tail(kprobe_run.stderr)


def check_tcp(run: Run, listeners: dict[str, int], host: str) -> None:
    flow = run.flow("tcp", host, listeners[host])
    assert flow is not None, f"no TCP flow to {host}: {run.flows}"
    assert flow["pid"] == run.clients[("tcp", host, listeners[host])], flow
    assert flow["uid"] == 0, flow


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("path", ["auto_run", "kprobe_run"])
def test_cgroup_hooks_and_kprobes_see_tcp(
    request: pytest.FixtureRequest, listeners: dict[str, int], path: str, address: str
) -> None:
    check_tcp(request.getfixturevalue(path), listeners, address)


UDP_DESTINATIONS = [("127.0.0.1", UDP4), ("::1", UDP6), ("127.0.0.1", CUDP4), ("::1", CUDP6)]


@pytest.mark.parametrize(("address", "port"), UDP_DESTINATIONS)
@pytest.mark.parametrize("path", ["auto_run", "kprobe_run"])
def test_udp_through_cgroup_hooks(request: pytest.FixtureRequest, path: str, address: str, port: int) -> None:
    run = request.getfixturevalue(path)
    assert "UDP: cgroup connect/sendmsg" in run.attached, run.attached
    assert run.flow("udp", address, port) is not None, f"no UDP flow to {address}:{port}: {run.flows}"


def test_connected_udp_first_send_path(auto_run: Run) -> None:
    """6.3+ has sock:sock_send_length for a connected socket's first send; 6.1 needs the egress program."""
    has_tp = Path("/sys/kernel/tracing/events/sock/sock_send_length").exists()
    expected = "raw tracepoint sock_send_length" if has_tp else "egress hooks"
    assert f"recvmsg/{expected}" in auto_run.attached, auto_run.attached


def test_dns_name_of_a_connect(auto_run: Run) -> None:
    flow = auto_run.flow("tcp", "127.0.0.1", DNS_PORT)
    assert flow is not None, auto_run.flows
    assert flow["hostname"] == DNS_NAME, flow


def test_lineage_of_a_process_that_lived_a_millisecond(auto_run: Run, blink: str) -> None:
    flow = auto_run.flow("tcp", "127.0.0.1", BLINK_PORT)
    assert flow is not None, auto_run.flows
    process = flow["process"]
    assert process["pid"] == auto_run.clients[("blink", blink, BLINK_PORT)], flow
    assert process["attribution"] == "kernel", process
    assert process["name"] == "blink" and process["cmdline"] == [blink, "127.0.0.1", str(BLINK_PORT)], process
    assert process["parent"]["pid"] == os.getpid(), process


def test_quiet_start(auto_run: Run) -> None:
    """stderr holds the tool's own lines only: no compiler warnings about the kernel's headers."""
    noise = [line for line in auto_run.stderr if not OWN_LINE.match(line)]
    assert not noise, f"{len(noise)} foreign lines on stderr, first: {noise[:10]}"


# The command of `trace -- CMD`: waits for a file, then runs the clients given as "kind host port" words.
COMMAND = textwrap.dedent(
    r"""
    import os, subprocess, sys, time
    go, client, words = sys.argv[1], sys.argv[2], sys.argv[3:]
    while not os.path.exists(go):
        time.sleep(0.1)
    for i in range(0, len(words), 3):
        subprocess.run([sys.executable, "-c", client, *words[i : i + 3]], check=True)
    """
)
OUTSIDE_PORT = 29107


@pytest.fixture(scope="module")
def command_run(listeners: dict[str, int], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """trace -- CMD on fentry, UDP through syscall tracepoints; a connect made outside the command
    while it runs must not be recorded."""
    go = tmp_path_factory.mktemp("command") / "go"
    words = [str(w) for item in common_traffic(listeners) for w in item]
    command = [sys.executable, "-c", COMMAND, str(go), CLIENT, *words]
    options = ["-I", "ebpf:probe:fentry", "-I", "ebpf:udp:syscalls"]
    return trace_once(options, [("tcp", "127.0.0.1", OUTSIDE_PORT)], command=command, go=go, wait_s=300)


def test_command_run_on_fentry_and_syscalls(command_run: Run) -> None:
    assert command_run.returncode == 0, tail(command_run.stderr)
    assert "fentry tcp_v4_connect/tcp_v6_connect" in command_run.attached, command_run.attached
    assert "UDP: syscall tracepoints" in command_run.attached, command_run.attached


@pytest.mark.parametrize(
    ("protocol", "host", "port"),
    [("tcp", "127.0.0.1", 0), ("tcp", "::1", 0), *(("udp", h, p) for h, p in UDP_DESTINATIONS)],
)
def test_command_connects_recorded(
    command_run: Run, listeners: dict[str, int], protocol: str, host: str, port: int
) -> None:
    port = port or listeners[host]
    assert command_run.flow(protocol, host, port) is not None, f"{protocol} {host}:{port}: {command_run.flows}"


def test_command_run_leaves_out_other_processes(command_run: Run) -> None:
    assert command_run.clients[("tcp", "127.0.0.1", OUTSIDE_PORT)]
    assert command_run.flow("tcp", "127.0.0.1", OUTSIDE_PORT) is None, command_run.flows


@pytest.fixture(scope="module")
def tracepoint_run(listeners: dict[str, int]) -> Run:
    """The tracepoint for TCP and the perf buffer (so UDP goes through syscall tracepoints)."""
    options = ["-I", "ebpf:probe:tracepoint", "-I", "ebpf:buffer:perf", "--no-lineage"]
    return trace_once(options, common_traffic(listeners))


def test_tracepoint_and_perf_buffer(tracepoint_run: Run, listeners: dict[str, int]) -> None:
    assert tracepoint_run.returncode == 0, tail(tracepoint_run.stderr)
    attached = tracepoint_run.attached
    assert "tracepoint sock:inet_sock_set_state" in attached and "perf buffer" in attached, attached
    assert "UDP: syscall tracepoints" in attached, attached
    for host in ("127.0.0.1", "::1"):
        check_tcp(tracepoint_run, listeners, host)
    for host, port in UDP_DESTINATIONS:
        assert tracepoint_run.flow("udp", host, port) is not None, f"udp {host}:{port}: {tracepoint_run.flows}"


def test_nflog(listeners: dict[str, int]) -> None:
    """The nflog input with rules of its own in the VM's namespace (the VM is this test's alone)."""
    run = trace(["-i", "nflog", "-I", "nflog:setup:auto", "--no-lineage"], common_traffic(listeners)[:3])
    assert run.returncode == 0, tail(run.stderr)
    for host in ("127.0.0.1", "::1"):
        assert run.flow("tcp", host, listeners[host]) is not None, f"tcp {host}: {run.flows}"
    assert run.flow("udp", "127.0.0.1", UDP4) is not None, run.flows
