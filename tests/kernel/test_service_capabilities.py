"""The capabilities of the systemd unit (packaging/systemd): a real trace run
as root with exactly the unit's bounding set (setpriv, as systemd's
CapabilityBoundingSet= leaves a root service) and NoNewPrivileges records
connections with their processes and services; removing any one capability of
the set breaks something, shown here for each.

The tool runs in the client namespace (nsenter: /sys and the cgroup tree stay
the host's); clients connect to closed ports of its loopback. Three kinds of
client: one running as nobody since before the trace started (known from
/proc only), one started during the trace, and one started during
the trace in a cgroup delegated to a user (mode 0700, as for rootless
containers)."""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import Namespace
from service_unit import as_root_service, unit_capabilities

from egress_auditor.attribution.cgroups import cgroup2_mount

EGRESS_AUDITOR = str(Path(sys.executable).with_name("egress-auditor"))
PYTHON = "/usr/bin/python3"
RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
STARTUP_S = 90.0
CONNECT = "import socket,sys; socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1])))"
# Runs as nobody from before the trace; connects to each port given on its stdin.
EARLY = "import socket,sys\nfor port in sys.stdin: socket.socket().connect_ex(('127.0.0.1', int(port)))"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ATTEMPTS = 5
LINE_WAIT_S = 15.0  # on a busy host the tool may be seconds behind
# The trace sees the whole host, where other tests (benchmarks) may open thousands of new flows a
# second: a larger flow map than the default keeps ours; the default event buffer keeps the tool
# at most a second or two behind (a larger one holds a longer backlog), so a lost event is retried.
BUSY_HOST = ["-I", "ebpf:max_flows:524288"]
CAP_NUMBERS = {"CAP_DAC_READ_SEARCH": 2, "CAP_NET_ADMIN": 12, "CAP_SYS_PTRACE": 19, "CAP_PERFMON": 38, "CAP_BPF": 39}


@dataclass
class Trace:
    returncode: int
    stderr: str
    flows: dict[int, dict]  # destination port -> the flow record
    cap_eff: int | None  # the running tool's effective set, from /proc
    ports: dict[str, list[int]]


def cleanup_cgroups(paths: list[Path]) -> None:
    for path in paths:
        for _ in range(100):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)  # exited clients are released a moment later


def trace_with(capabilities: list[str], ns: Namespace, tmp: Path) -> Trace:
    """A trace with this bounding set; the three kinds of client connect while it runs."""
    ports: dict[str, list[int]] = {"early": [], "new": [], "cgroup": []}
    fresh = iter(range(random.randrange(20000, 50000), 60000))
    # argv[0] relative, as most daemons have it: psutil cannot guess the program from it.
    early = subprocess.Popen(
        ns.cmd([*NOBODY, "env", "PATH=/usr/bin", "python3", "-c", EARLY]),
        stdin=subprocess.PIPE,
        text=True,
    )
    assert early.stdin is not None
    err_path = tmp / f"stderr-{random.randrange(1 << 30)}"
    ns_enter = ["nsenter", f"--net=/run/netns/{ns.name}"]
    limits = as_root_service(capabilities)
    proc = subprocess.Popen(
        [*ns_enter, *limits, EGRESS_AUDITOR, "trace", "--no-live", "--summary-every", "1s", "-o", "json", *BUSY_HOST],
        stdout=subprocess.PIPE,
        stderr=err_path.open("w"),
        text=True,
    )

    def recorded(kind: str, connect: Callable[[int], None]) -> None:
        """Connects (to a new port each time) until the tool shows the connection with its process:
        on a host busy with other tests, a new flow's event may be lost (counted, recovered bare)."""
        for _ in range(ATTEMPTS):
            port = next(fresh)
            connect(port)
            if wait_for_line(f"127.0.0.1:{port} by python3 (pid", err_path, proc):
                ports[kind].append(port)
                return
        ours = [line for line in err_path.read_text().splitlines() if "127.0.0.1:" in line or "lost" in line]
        raise AssertionError(f"no {kind} connection recorded in {ATTEMPTS} attempts (early: {early.poll()}): {ours}")

    def from_early(port: int) -> None:
        early.stdin.write(f"{port}\n")  # type: ignore[union-attr]
        early.stdin.flush()  # type: ignore[union-attr]

    def from_new(port: int, cgroup: Path | None = None) -> None:
        def enter() -> None:
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text("0\n")

        assert subprocess.run(ns.cmd([PYTHON, "-c", CONNECT, str(port)]), preexec_fn=enter, timeout=30).returncode == 0

    cgroups: list[Path] = []
    cap_eff = None
    try:
        deadline = time.monotonic() + STARTUP_S
        while RUNNING_LINE not in err_path.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        if proc.poll() is None:
            cap_eff = effective_capabilities(proc.pid)
            recorded("early", from_early)
            recorded("new", from_new)
            root = cgroup2_mount()
            assert root is not None
            # A subtree delegated to a user, as for rootless containers: root's uid alone cannot list it.
            delegated = root / f"ea-caps-{secrets.token_hex(3)}"
            service = delegated / "app.service"
            service.mkdir(parents=True)
            cgroups += [service, delegated]
            os.chown(delegated, 65534, 65534)
            delegated.chmod(0o700)
            recorded("cgroup", lambda port: from_new(port, service))
            assert wait_for_line("egress-auditor: summary: ", err_path, proc)  # every second
            proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        early.kill()
        early.wait()
        cleanup_cgroups(cgroups)
    flows = {}
    for line in stdout.splitlines():
        record = json.loads(line)
        if record["type"] == "flow" and record["dst"] == "127.0.0.1":
            flows[record["dport"]] = record
    return Trace(proc.returncode, err_path.read_text(), flows, cap_eff, ports)


def wait_for_line(text: str, err: Path, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + LINE_WAIT_S
    while text not in err.read_text():
        assert proc.poll() is None, err.read_text()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def effective_capabilities(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def mask(capabilities: list[str]) -> int:
    return sum(1 << CAP_NUMBERS[c] for c in capabilities)


def test_the_units_capabilities_record_connections_with_processes_and_services(
    client_ns: Namespace, tmp_path: Path
) -> None:
    capabilities = unit_capabilities()
    run = trace_with(capabilities, client_ns, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.cap_eff == mask(capabilities)  # exactly the unit's set, no more
    # The journal's periodic line, with the tool's own memory as the kernel counts it.
    assert re.search(
        r"^egress-auditor: summary: \d+ flows, \d+ connections, \d+ events lost, [1-9]\d* MB resident", run.stderr, re.M
    )
    early = run.flows[run.ports["early"][0]]["process"]
    assert (early["user"], early["name"]) == ("nobody", "python3")
    assert early["exe"] and early["cmdline"] == ["python3", "-c", EARLY], early
    new = run.flows[run.ports["new"][0]]["process"]
    assert new["name"] == "python3" and new["cmdline"][-1] == str(run.ports["new"][0]), new
    (port,) = run.ports["cgroup"]
    process = run.flows[port]["process"]
    assert re.fullmatch(r"/ea-caps-[0-9a-f]{6}/app\.service", process.get("cgroup", "")), process
    assert process["service"] == "app.service", process


# What breaks without each capability of the unit: every one must be listed here.
def start_fails(run: Trace) -> None:
    assert run.returncode != 0 and run.cap_eff is None
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    # One line: the privilege check names CAP_BPF and CAP_PERFMON; the kernel refuses the cgroup hooks.
    assert last.startswith(("egress-auditor: error: needs root", "egress-auditor: error: could not load")), last


def early_process_unread(run: Trace) -> None:
    assert run.returncode == 0, run.stderr
    early = run.flows[run.ports["early"][0]]["process"]
    assert early["user"] == "nobody" and early["name"] == "python3"  # the kernel still names it
    assert not early.get("exe") and not early.get("cmdline"), early


def delegated_cgroup_unnamed(run: Trace) -> None:
    """Without it the tool finds a cgroup by walking the tree (at most once a second, so a cgroup
    made since the last walk is also missed); a directory root's uid may not list stays unknown."""
    assert run.returncode == 0, run.stderr
    (port,) = run.ports["cgroup"]
    process = run.flows[port]["process"]
    assert process["name"] == "python3" and not process.get("cgroup") and not process.get("service"), process


BROKEN_WITHOUT = {
    "CAP_BPF": start_fails,
    "CAP_PERFMON": start_fails,
    "CAP_NET_ADMIN": start_fails,
    "CAP_SYS_PTRACE": early_process_unread,
    "CAP_DAC_READ_SEARCH": delegated_cgroup_unnamed,
}


def test_every_capability_of_the_unit_is_shown_necessary() -> None:
    assert sorted(unit_capabilities()) == sorted(BROKEN_WITHOUT)


@pytest.mark.parametrize("dropped", sorted(BROKEN_WITHOUT))
def test_without_one_capability_of_the_unit_something_breaks(
    dropped: str, client_ns: Namespace, tmp_path: Path
) -> None:
    run = trace_with([c for c in unit_capabilities() if c != dropped], client_ns, tmp_path)
    BROKEN_WITHOUT[dropped](run)
