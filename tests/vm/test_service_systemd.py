"""Inside a VM of a stock kernel (scripts/vm_test.py): the shipped unit run by a real systemd as PID 1.

systemd 252 (this machine's own) boots as PID 1 of a new PID, mount, UTS and IPC namespace whose root
is an overlay of the VM's root with a tmpfs on top, as a container manager would start it
(docs/decisions/service-under-systemd.md says why this way). The VM's network namespace and cgroup
tree are its own, so the unit traces the whole VM as on a host. The unit is installed as
scripts/install-service.sh does it; the environment in /opt/egress-auditor is assembled from this
checkout's (the VM has no package index for pip). Only the intervals (the options file, as an
operator changes them) and RestartSec (a drop-in) are shortened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from service_unit import UNIT, unit_capabilities

HERE = Path(__file__).resolve().parents[2]
STATE = Path("/var/lib/egress-auditor")
RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
STARTUP_S = 420.0  # BCC compiles and attaches in about 80 s under TCG; a loaded host doubles that
BOOT_S = 180.0
CAPABILITY_BITS = {
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_PTRACE": 19,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}
SUMMARY = re.compile(r"^egress-auditor: summary: \d+ flows, \d+ connections, \d+ events lost, \d+ MB resident, up ")


def wait_for(condition: Callable[[], object], timeout_s: float, what: Callable[[], str] | str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:.0f} s: {what() if callable(what) else what}", pytrace=False)
        time.sleep(1)


@dataclass
class System:
    """systemd as PID 1 of its own namespaces; `root` is its root as this namespace sees it."""

    pid: int
    root: Path

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A command in the system: its file system and its PID namespace (systemctl, curl...)."""
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *argv: str, timeout: float = 120) -> str:
        done = self.run(*argv, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(argv)}: exit {done.returncode}: {done.stdout}{done.stderr}"
        return done.stdout

    def show(self, unit: str, prop: str) -> str:
        return self.ok("systemctl", "show", "-P", prop, unit).strip()

    def journal(self, unit: str, invocation: str | None = None) -> list[str]:
        """The unit's messages, or one run's (an invocation of it) alone."""
        match = [f"_SYSTEMD_INVOCATION_ID={invocation}"] if invocation else ["-u", unit]
        return self.ok("journalctl", "--no-pager", "-o", "cat", *match).splitlines()

    def path(self, inside: Path) -> Path:
        return self.root / inside.relative_to("/")


def boot(base: Path) -> tuple[subprocess.Popen[bytes], int]:
    """An overlay of / (tmpfs on top) mounted at base/root, and systemd started on it as PID 1."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "egress-auditor-sut", str(base)], check=True)
    for part in ("upper", "work", "root"):
        (base / part).mkdir()
    overlay = f"lowerdir=/,upperdir={base / 'upper'},workdir={base / 'work'}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", overlay, str(base / "root")], check=True)
    root = base / "root"
    # This machine's own services (a database, the apt timers, gettys on its console) stay off:
    # the system under test is the distribution's systemd and this unit.
    units = root / "etc" / "systemd" / "system"
    for wanted in units.glob("*.wants/*"):
        (units / wanted.name).unlink(missing_ok=True)
        (units / wanted.name).symlink_to("/dev/null")
    (units / "console-getty.service").symlink_to("/dev/null")
    # The API file systems are mounted first and container= is set, as container managers do: without,
    # systemd sets up the VM's devices as a host's init and stalls (docs/decisions/service-under-systemd.md).
    init = (
        "mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t cgroup2 cgroup2 /sys/fs/cgroup"
        " && mount -t devtmpfs devtmpfs /dev"
        " && exec env container=egress-auditor-test /lib/systemd/systemd --system --unit=multi-user.target"
    )
    proc = subprocess.Popen(
        ["unshare", "--pid", "--mount", "--uts", "--ipc", "--fork", "--propagation", "private", "sh", "-c",
         f"cd {root} && mount --move . / && exec chroot . sh -c '{init}'"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    wait_for(lambda: proc.poll() is not None or children.read_text().split(), 30, "the namespace's first process")
    assert proc.poll() is None, f"unshare exited {proc.returncode}"
    return proc, int(children.read_text().split()[0])


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    base = Path("/run/egress-auditor-sut")
    base.mkdir(exist_ok=True)
    proc, pid = boot(base)
    sut = System(pid, base / "root")
    try:
        # "offline" until the manager is up, then "initializing" and "starting" until its jobs are done.
        state = ""

        def started() -> bool:
            nonlocal state
            done = sut.run("systemctl", "is-system-running")
            state = done.stdout.strip() or done.stderr.strip()  # nothing on stdout: not even the bus yet
            return state in ("running", "degraded", "maintenance", "stopping")

        wait_for(started, BOOT_S, lambda: f"the system still {state}")
        failed = sut.run("systemctl", "--failed", "--no-legend", "--plain").stdout
        assert state == "running", f"system {state}; failed units: {failed}"
        yield sut
    finally:
        os.kill(pid, signal.SIGKILL)  # PID 1 gone: the kernel ends every process of its namespace
        proc.wait(timeout=60)
        subprocess.run(["umount", "-R", "-l", str(base)], check=False)


class _Quiet(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_ports() -> Iterator[tuple[int, int]]:
    """Two HTTP servers on 127.0.0.1 (the VM's loopback, which the system under test shares)."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Quiet) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers[0].server_address[1], servers[1].server_address[1]
    for server in servers:
        server.shutdown()
        server.server_close()


def install(sut: System) -> None:
    """What scripts/install-service.sh does, in the system. Its pip step needs a package index the
    VM lacks, so the environment is built as pip would from a wheel: this checkout's .venv (the
    dependencies) copied to /opt/egress-auditor, the tool's package and BPF sources put into it
    in place of the editable link. A link to the checkout would not do: ProtectHome hides a
    checkout under /root or /home from the unit."""
    venv = sut.path(Path("/opt/egress-auditor"))
    if venv.is_symlink() or venv.is_file():  # one this machine has (in the lower layer) is replaced
        venv.unlink()
    elif venv.exists():
        shutil.rmtree(venv)
    shutil.copytree(HERE / ".venv", venv, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    (site,) = venv.glob("lib/python3*/site-packages")
    for editable in [*site.glob("_editable_impl_*.pth"), *site.glob("__editable__*")]:
        editable.unlink()
    package = site / "egress_auditor"
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(HERE / "egress_auditor", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(HERE / "bpf", package / "bpf")
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            text = script.read_bytes()
            if text.startswith(f"#!{HERE / '.venv'}/".encode()):
                script.write_bytes(text.replace(str(HERE / ".venv").encode(), b"/opt/egress-auditor", 1))
    # The checkout may lie where the system does not see it (the VM's /tmp is not in its root): the
    # files are handed in first, then installed from inside as the script installs them.
    handed = Path("/var/tmp/egress-auditor-install")
    sut.path(handed).mkdir(parents=True, exist_ok=True)
    shutil.copy(UNIT, sut.path(handed / "egress-auditor.service"))
    shutil.copy(HERE / "packaging" / "systemd" / "egress-auditor.env", sut.path(handed / "egress-auditor.env"))
    sut.ok("install", "-D", "-m", "0644", str(handed / "egress-auditor.service"),
           "/etc/systemd/system/egress-auditor.service")  # fmt: skip
    sut.ok("install", "-D", "-m", "0644", str(handed / "egress-auditor.env"), "/etc/default/egress-auditor")
    # As an operator would: shorter intervals in the options file, a quicker restart in a drop-in.
    options = sut.path(Path("/etc/default/egress-auditor"))
    text = options.read_text()
    assert "--snapshot-every 10m" in text and "--summary-every 10m" in text, text
    shorter = text.replace("--snapshot-every 10m", "--snapshot-every 3s")
    shorter = shorter.replace("--summary-every 10m", "--summary-every 5s")
    options.write_text(shorter)
    drop_in = sut.path(Path("/etc/systemd/system/egress-auditor.service.d/restart.conf"))
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text("[Service]\nRestartSec=1\n")
    sut.ok("systemctl", "daemon-reload")


def records(capture: Path) -> list[dict]:
    text = capture.read_text() if capture.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]  # whole lines only


def checkpoint_count(capture: Path, port: int) -> int | None:
    """The connections the capture's last checkpoint gives the flow to 127.0.0.1:port (None: none holds it)."""
    found = None
    for record in records(capture):
        if record["type"] == "checkpoint":
            for totals in record["totals"]:
                if (totals["dst"], totals["dport"]) == ("127.0.0.1", port):
                    found = totals["connections"]
    return found


def rule_line(text: str, port: int) -> str:
    lines = [line for line in text.splitlines() if f"TCP to 127.0.0.1 port {port}:" in line]
    assert len(lines) == 1, text
    return lines[0]


def new_flow_lines(lines: list[str], port: int) -> list[str]:
    flow = re.compile(rf"^new TCP connection .*-> 127\.0\.0\.1:{port} by curl \(pid \d+, user root\)$")
    return [line for line in lines if flow.match(line)]


def test_the_unit_records_snapshots_restarts_resumed_and_stops_with_its_files(
    system: System, http_ports: tuple[int, int]
) -> None:
    sut, (first_port, second_port) = system, http_ports
    unit = "egress-auditor"
    capture, nft = sut.path(STATE / "capture.jsonl"), sut.path(STATE / "egress.nft")
    rules_v4, rules_v6 = sut.path(STATE / "iptables" / "rules.v4"), sut.path(STATE / "iptables" / "rules.v6")

    def journal_tail() -> str:
        return "\n".join(sut.journal(unit)[-15:])

    def curl(port: int) -> None:
        sut.ok("curl", "-sS", "-o", "/dev/null", "--max-time", "20", f"http://127.0.0.1:{port}/")

    install(sut)
    sut.ok("systemctl", "enable", "--now", unit)
    wait_for(lambda: RUNNING_LINE in sut.journal(unit), STARTUP_S, journal_tail)

    # The unit's own sandbox, as systemd set it up: exactly its capabilities, no new privileges.
    first_pid = int(sut.show(unit, "MainPID"))
    status = dict(line.split(":\t", 1) for line in sut.ok("cat", f"/proc/{first_pid}/status").splitlines())
    expected = sum(1 << CAPABILITY_BITS[c] for c in unit_capabilities())
    assert int(status["CapBnd"], 16) == expected, status["CapBnd"]
    assert status["NoNewPrivs"].strip() == "1"

    # 1. Connections made in the system, by curl, to a real server, are recorded.
    for _ in range(3):
        curl(first_port)
    first_invocation = sut.show(unit, "InvocationID")
    wait_for(lambda: new_flow_lines(sut.journal(unit), first_port), 60, journal_tail)

    # 2. A snapshot: a checkpoint with the three connects, and the rule files, before any stop.
    wait_for(lambda: checkpoint_count(capture, first_port) == 3, 60, lambda: f"{records(capture)[-2:]}")
    wait_for(lambda: rules_v4.exists() and f"port {first_port}:" in rules_v4.read_text(), 60, "rules.v4")
    assert rules_v6.exists()
    assert "3 connection(s)" in rule_line(nft.read_text(), first_port)
    assert sut.show(unit, "NRestarts") == "0"

    # 3. SIGKILL: systemd restarts it (Restart=on-failure), and the next run resumes the counts.
    sut.ok("systemctl", "kill", "-s", "KILL", unit)
    wait_for(lambda: sut.show(unit, "NRestarts") == "1", 60, lambda: f"a restart; unit {sut.show(unit, 'ActiveState')}")
    second_invocation = sut.show(unit, "InvocationID")
    assert second_invocation != first_invocation
    assert int(sut.show(unit, "MainPID")) not in (0, first_pid)
    wait_for(lambda: RUNNING_LINE in sut.journal(unit, second_invocation), STARTUP_S, journal_tail)
    resumed = sut.journal(unit, second_invocation)
    assert any("counts as of its last checkpoint" in line for line in resumed), resumed
    for _ in range(2):
        curl(first_port)
    curl(second_port)
    wait_for(lambda: checkpoint_count(capture, second_port) == 1, 60, lambda: f"{records(capture)[-2:]}")
    # A summary line every 5 s (--summary-every), in the journal.
    wait_for(lambda: sum(map(bool, map(SUMMARY.match, sut.journal(unit, second_invocation)))) >= 2, 60, journal_tail)

    # 4. A stop (SIGTERM) ends the run cleanly, with every file written: the counts of both runs.
    sut.ok("systemctl", "stop", unit, timeout=180)
    assert (sut.show(unit, "ActiveState"), sut.show(unit, "Result")) == ("inactive", "success")
    assert "5 connection(s)" in rule_line(nft.read_text(), first_port)
    assert "5 connection(s)" in rule_line(rules_v4.read_text(), first_port)
    assert "1 connection(s)" in rule_line(rules_v4.read_text(), second_port)
    assert "COMMIT" in rules_v6.read_text()
    assert records(capture)[-1]["type"] == "summary"
    # What docs/service.md gives for rules at any time, run in the system.
    rebuilt = sut.run("/opt/egress-auditor/bin/egress-auditor", "rules", "--from", str(STATE / "capture.jsonl"))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "5 connection(s)" in rule_line(rebuilt.stdout, first_port)

    # 5. The journal: one line per new flow, not per connect (the periodic summaries are above).
    first_run = sut.journal(unit, first_invocation)
    assert len(new_flow_lines(first_run, first_port)) == 1, first_run
    everything = sut.journal(unit)
    assert len(new_flow_lines(everything, second_port)) == 1, everything
