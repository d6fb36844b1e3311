"""`egress-auditor trace` end to end: the installed command as a subprocess,
real clients in the client namespace, real HTTP servers in the server
namespace, and the printed rules applied with iptables inside the client
namespace (never in the machine's own). The tracer sees the whole host:
checks filter on this test's addresses; --count assumes no other process
floods the host with connections meanwhile (as CI runs tests one by one)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import Link, Namespace, http_server

EGRESS_AUDITOR = Path(sys.executable).with_name("egress-auditor")
RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
SEEN_PORT, UNSEEN_PORT = 18080, 18081
STARTUP_S = 30.0  # compiling the BPF program takes about a second; CI machines are slower

# Holds the connection open a while, so the tracer finds the process alive in /proc.
HOLDING_CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
time.sleep(float(sys.argv[3]))
s.close()
"""

# Connects in a burst, then stops the tracer at once (SIGINT): the last connects are in the kernel map only.
BURST_CLIENT = r"""
import os, signal, socket, sys
for _ in range(int(sys.argv[3])):
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
os.kill(int(sys.argv[4]), signal.SIGINT)
"""


def tail(lines: Sequence[str], count: int = 40) -> str:
    return "\n".join(lines[-count:])


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: list[str]
    ended: float  # time.monotonic() when the process was seen to exit

    @property
    def log(self) -> str:
        """The end of stderr, for assertion messages (a busy host can make it long)."""
        return tail(self.stderr)


class Tracer:
    """A running `egress-auditor` whose stderr is read line by line as it comes."""

    def __init__(self, args: Sequence[str], ns: Namespace | None = None, prefix: Sequence[str] = ()) -> None:
        argv = [*prefix, str(EGRESS_AUDITOR), *args]
        self.proc = subprocess.Popen(
            ns.cmd(argv) if ns else argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stderr: list[str] = []
        self.stdout = ""
        self.running_at: float | None = None
        self._running = threading.Event()
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            if line.rstrip("\n") == RUNNING_LINE:
                self.running_at = time.monotonic()
                self._running.set()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()

    def wait_running(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while not self._running.wait(0.1):
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}): {tail(self.stderr)}"
            assert time.monotonic() < deadline, f"no running line after {STARTUP_S}s: {tail(self.stderr)}"

    def finish(self, timeout: float) -> Finished:
        """Wait for the process to end by itself within timeout seconds."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"egress-auditor did not stop within {timeout}s: {tail(self.stderr)}")
        ended = time.monotonic()
        for reader in self._readers:
            reader.join(timeout=10)
        return Finished(self.proc.returncode, self.stdout, list(self.stderr), ended)


@pytest.fixture
def start_tracer() -> Iterator[Callable[..., Tracer]]:
    """Starts tracers; any still running when the test ends is killed."""
    started: list[Tracer] = []

    def start(args: Sequence[str], ns: Namespace | None = None, prefix: Sequence[str] = ()) -> Tracer:
        started.append(Tracer(args, ns, prefix))
        return started[-1]

    yield start
    for tracer in started:
        if tracer.proc.poll() is None:
            tracer.proc.kill()
            tracer.proc.wait()


@pytest.fixture
def servers(net: Link) -> Iterator[Link]:
    """HTTP servers on a port the trace will see and one it will not."""
    with http_server(net.b, SEEN_PORT), http_server(net.b, UNSEEN_PORT):
        yield net


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def curl(ns: Namespace, host: str, port: int) -> tuple[int, int]:
    """curl in ns: (exit status, pid); ip netns exec execs, so the pid is curl's."""
    proc = ns.popen(
        ["curl", "-sS", "-o", "/dev/null", "--max-time", "2", url(host, port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc.wait(timeout=10), proc.pid


def python_connect(ns: Namespace, host: str, port: int, hold: float = 0.0, marker: str = "") -> None:
    argv = [sys.executable, "-c", HOLDING_CLIENT, host, str(port), str(hold)]
    ns.run([*argv, marker] if marker else argv)


def new_flow_lines(stderr: list[str], host: str, port: int, comm: str | None = None) -> list[str]:
    endpoint = re.escape(f"[{host}]" if ":" in host else host)
    by = rf" by {re.escape(comm)} " if comm else " by "
    pattern = re.compile(rf"^new TCP connection (?:\S+ )?-> {endpoint}:{port}\b.*{by}")
    return [line for line in stderr if pattern.search(line)]


def assert_running_line_first(stderr: list[str]) -> None:
    assert RUNNING_LINE in stderr, tail(stderr)
    flows = [i for i, line in enumerate(stderr) if line.startswith("new TCP connection")]
    assert flows and stderr.index(RUNNING_LINE) < flows[0], tail(stderr)


def restore_rule(host: str, port: int) -> str:
    prefix = 128 if ":" in host else 32
    return f"-A OUTPUT -d {host}/{prefix} -p tcp -m tcp --dport {port} "


def assert_allowed_and_blocked(net: Link, hosts: Sequence[str]) -> None:
    # Forget IPv6 neighbours: reaching the server again needs neighbour discovery through the rules.
    net.a.run(["ip", "-6", "neigh", "flush", "all"])
    for host in hosts:
        assert curl(net.a, host, SEEN_PORT)[0] == 0, f"seen {host}:{SEEN_PORT} was blocked"
        assert curl(net.a, host, UNSEEN_PORT)[0] != 0, f"unseen {host}:{UNSEEN_PORT} was allowed"


def assert_reachable(net: Link, hosts: Sequence[str]) -> None:
    """Before any rule: both ports answer, so a later failure is the rules' doing."""
    for host in hosts:
        for port in (SEEN_PORT, UNSEEN_PORT):
            assert curl(net.a, host, port)[0] == 0, f"{host}:{port} unreachable before the rules"


def test_restore_rules_allow_what_was_seen_and_block_the_rest(
    start_tracer: Callable[..., Tracer], servers: Link, tmp_path: Path
) -> None:
    net = servers
    rules_dir = tmp_path / "rules"
    duration = 4
    tracer = start_tracer(
        [
            "trace",
            "--duration",
            str(duration),
            "--no-live",
            "-O",
            "iptables:format:restore",
            "-O",
            "iptables:policy:drop",
            "-O",
            f"iptables:dir:{rules_dir}",
        ]
    )
    tracer.wait_running()
    first_pids = {}
    for host in (net.b4, net.b6):
        for _ in range(2):  # a repeat of a flow is no new line
            status, pid = curl(net.a, host, SEEN_PORT)
            assert status == 0
            first_pids.setdefault(host, pid)
    python_connect(net.a, net.b4, SEEN_PORT)
    done = tracer.finish(timeout=duration + 15)

    assert done.returncode == 0, done.log
    assert_running_line_first(done.stderr)
    for host in (net.b4, net.b6):
        lines = new_flow_lines(done.stderr, host, SEEN_PORT, "curl")
        assert len(lines) == 1, lines
        assert f"(pid {first_pids[host]}, user root)" in lines[-1]
    assert len(new_flow_lines(done.stderr, net.b4, SEEN_PORT)) == 2, "curl and python are two flows"
    assert not any("Traceback" in line for line in done.stderr)

    rules_v4 = done.stdout
    rules_v6 = (rules_dir / "rules.v6").read_text()
    assert (rules_dir / "rules.v4").read_text() == rules_v4
    assert ":OUTPUT DROP [0:0]" in rules_v4 and rules_v4.rstrip().endswith("COMMIT")
    assert restore_rule(net.b4, SEEN_PORT) in rules_v4
    assert net.b6 not in rules_v4, "stdout holds the IPv4 rules only"
    assert restore_rule(net.b6, SEEN_PORT) in rules_v6
    assert "--icmpv6-type neighbour-solicitation -j ACCEPT" in rules_v6
    for rules in (rules_v4, rules_v6):
        assert f"--dport {UNSEEN_PORT} " not in rules

    assert_reachable(net, (net.b4, net.b6))
    net.a.run(["iptables-restore", "--test"], input=rules_v4)
    net.a.run(["ip6tables-restore", "--test"], input=rules_v6)
    net.a.run(["iptables-restore"], input=rules_v4)
    net.a.run(["ip6tables-restore"], input=rules_v6)
    assert "policy DROP" in net.a.run(["iptables", "-L", "OUTPUT", "-n"]).stdout
    assert_allowed_and_blocked(net, (net.b4, net.b6))


def test_command_rules_run_by_sh_allow_what_was_seen_and_block_the_rest(
    start_tracer: Callable[..., Tracer], servers: Link
) -> None:
    net = servers
    tracer = start_tracer(["trace", "--duration", "3", "--no-live", "-O", "iptables:policy:drop"])
    tracer.wait_running()
    for host in (net.b4, net.b6):
        assert curl(net.a, host, SEEN_PORT)[0] == 0
    done = tracer.finish(timeout=20)

    assert done.returncode == 0, done.log
    script = done.stdout
    assert script.startswith("#!/bin/sh\n")
    assert re.search(rf"(?m)^iptables -I OUTPUT \d+ -d {net.b4}/32 -p tcp -m tcp --dport {SEEN_PORT} ", script)
    assert re.search(rf"(?m)^ip6tables -I OUTPUT \d+ -d {net.b6}/128 -p tcp -m tcp --dport {SEEN_PORT} ", script)
    assert_reachable(net, (net.b4, net.b6))
    # On stdin: a busy host's script can be longer than an argument may be.
    net.a.run(["sh", "-e"], input=script)
    assert_allowed_and_blocked(net, (net.b4, net.b6))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_still_prints_every_rule(
    start_tracer: Callable[..., Tracer], servers: Link, signum: int
) -> None:
    net = servers
    tracer = start_tracer(["trace", "--duration", "60", "--no-live"])
    tracer.wait_running()
    assert curl(net.a, net.b4, SEEN_PORT)[0] == 0
    python_connect(net.a, net.b6, SEEN_PORT)
    # Signalled straight after the connects: the final drain and map sync must still catch them.
    tracer.proc.send_signal(signum)
    sent = time.monotonic()
    done = tracer.finish(timeout=15)

    assert done.returncode == 0, done.log
    assert done.ended - sent < 5
    assert re.search(rf"(?m)^iptables -I OUTPUT \d+ -d {net.b4}/32 -p tcp -m tcp --dport {SEEN_PORT} ", done.stdout)
    assert re.search(rf"(?m)^ip6tables -I OUTPUT \d+ -d {net.b6}/128 -p tcp -m tcp --dport {SEEN_PORT} ", done.stdout)
    assert done.stdout.endswith("\n")
    assert any(f"stopped ({signal.Signals(signum).name})" in line for line in done.stderr), done.log


def test_a_burst_stopped_at_once_keeps_its_exact_count(start_tracer: Callable[..., Tracer], servers: Link) -> None:
    """The last connects of a burst, made just before the stop, are read from the kernel into the rules."""
    net = servers
    tracer = start_tracer(["trace", "--duration", "60", "--no-live", "-O", "iptables:verbose:1"])
    tracer.wait_running()
    burst = 41
    net.a.run([sys.executable, "-c", BURST_CLIENT, net.b4, str(SEEN_PORT), str(burst), str(tracer.proc.pid)])
    done = tracer.finish(timeout=15)

    assert done.returncode == 0, done.log
    assert any("stopped (SIGINT)" in line for line in done.stderr), done.log
    assert f"# TCP to {net.b4} port {SEEN_PORT}: {burst} connection(s)" in done.stdout, done.stdout


def test_count_stops_after_that_many_connections(start_tracer: Callable[..., Tracer], servers: Link) -> None:
    net = servers
    tracer = start_tracer(["trace", "--count", "3", "--duration", "60", "--no-live"])
    tracer.wait_running()
    for _ in range(3):
        assert curl(net.a, net.b4, SEEN_PORT)[0] == 0
    third = time.monotonic()
    done = tracer.finish(timeout=15)

    assert done.returncode == 0, done.log
    assert done.ended - third < 5, "--count 3 did not end the run"
    assert any("stopped (count reached)" in line for line in done.stderr), done.log
    assert f"-d {net.b4}/32 -p tcp -m tcp --dport {SEEN_PORT} " in done.stdout


def test_duration_ends_the_run_in_time(start_tracer: Callable[..., Tracer]) -> None:
    duration = 2.0
    tracer = start_tracer(["trace", "--duration", f"{duration:g}s", "--no-live"])
    tracer.wait_running()
    done = tracer.finish(timeout=duration + 15)

    assert done.returncode == 0, done.log
    assert tracer.running_at is not None
    assert duration - 0.2 <= done.ended - tracer.running_at <= duration + 2.5
    assert any("stopped (duration reached)" in line for line in done.stderr), done.log
    assert done.stdout.startswith("#!/bin/sh\n")


def test_unprivileged_user_gets_one_line_naming_root(nobody_cli: list[str]) -> None:
    done = subprocess.run(
        [*nobody_cli, "trace", "--duration", "2", "--no-live"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "root" in lines[0] or "sudo" in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_go_tool_flag_form_with_verbose_comments(start_tracer: Callable[..., Tracer], servers: Link) -> None:
    net = servers
    marker = "ea-verbose-marker"
    tracer = start_tracer(["-i", "ebpf", "-o", "iptables", "-O", "iptables:verbose:2", "-t", "3"])
    tracer.wait_running()
    status, curl_pid = curl(net.a, net.b4, SEEN_PORT)
    assert status == 0
    python_connect(net.a, net.b4, SEEN_PORT, hold=1.0, marker=marker)
    done = tracer.finish(timeout=20)

    assert done.returncode == 0, done.log
    lines = done.stdout.splitlines()
    assert f"# TCP to {net.b4} port {SEEN_PORT}: 2 connection(s)" in "\n".join(lines)
    assert any(line.startswith(f"#   curl (pid {curl_pid}") for line in lines), done.stdout
    # Verbose 2: the live python client's command line and its parent.
    assert any(line.startswith("#     command line: ") and marker in line for line in lines), done.stdout
    assert any(line.startswith("#     Parent of this process was ") for line in lines), done.stdout
    assert re.search(rf"(?m)^iptables -I OUTPUT \d+ -d {net.b4}/32 -p tcp -m tcp --dport {SEEN_PORT} ", done.stdout)


def test_runs_inside_a_network_namespace_and_mounts_tracefs(start_tracer: Callable[..., Tracer], servers: Link) -> None:
    net = servers
    # ip netns exec remounts /sys, which hides the host's tracefs: the tool mounts its own.
    tracer = start_tracer(["trace", "--duration", "3", "--no-live"], ns=net.a)
    tracer.wait_running()
    status, curl_pid = curl(net.a, net.b4, SEEN_PORT)
    assert status == 0
    done = tracer.finish(timeout=20)

    assert done.returncode == 0, done.log
    attached = [line for line in done.stderr if "input attached" in line]
    assert attached and "mounted tracefs at /sys/kernel/tracing" in attached[0], done.log
    lines = new_flow_lines(done.stderr, net.b4, SEEN_PORT, "curl")
    assert len(lines) == 1 and f"(pid {curl_pid}," in lines[0], done.log
    assert re.search(rf"(?m)^iptables -I OUTPUT \d+ -d {net.b4}/32 -p tcp -m tcp --dport {SEEN_PORT} ", done.stdout)
