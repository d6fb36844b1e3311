"""The unit's file-system sandbox, rebuilt with a private mount namespace
(no systemd runs here): ProtectSystem=strict (every mount read-only but /dev,
/proc, /sys), ProtectControlGroups (the cgroup tree read-only), ProtectHome
(/home, /root, /run/user hidden), PrivateTmp (empty /tmp, /var/tmp) and
ReadWritePaths for the state directory alone; inside it, the unit's
capabilities and no_new_privs. A real trace there records a connection and
writes its capture and its rules into the state directory, and nowhere else."""

from __future__ import annotations

import json
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Namespace
from service_unit import as_root_service, unit_capabilities
from unprivileged import copied_cli

ENV_FILE = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "egress-auditor.env"

PYTHON = "/usr/bin/python3"
RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
STARTUP_S = 90.0
CONNECT = "import socket,sys; socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1])))"

# $1: the state directory; the rest: the command to run in the sandbox.
SANDBOX = r"""
set -eu
state=$1; shift
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mount; do
  case "$mount" in /dev|/dev/*|/proc|/proc/*|/sys|/sys/kernel/*) continue ;; esac
  mount -o remount,bind,ro "$mount" 2>/dev/null || mount --bind -o ro "$mount" "$mount"
done
for dir in /home /root /run/user; do [ -d "$dir" ] && mount -t tmpfs -o ro,mode=0 tmpfs "$dir"; done
for dir in /tmp /var/tmp; do mount -t tmpfs -o mode=1777 tmpfs "$dir"; done
mount --bind "$state" "$state"
mount -o remount,bind,rw "$state"
for probe in /usr/.ea-probe /etc/.ea-probe /var/lib/.ea-probe /sys/fs/cgroup/.ea-probe; do
  if touch "$probe" 2>/dev/null; then echo "sandbox: $probe is writable" >&2; exit 99; fi
done
exec "$@"
"""


# In the sandbox: the state directory is writable, /var/lib and /root are not, /tmp is empty.
PROBE = (
    'touch "$0/ok" && ! touch /var/lib/.ea-outside 2>/dev/null && ! touch /root/.ea 2>/dev/null && ls -A /tmp | wc -l'
)


def service_options(state: Path) -> list[str]:
    """The options the unit runs with, from its options file, with its state directory moved to `state`."""
    for line in ENV_FILE.read_text().splitlines():
        if line.startswith("EGRESS_AUDITOR_OPTIONS="):
            # systemd splits an unbraced $VAR at whitespace, after the file's own quotes are removed.
            words = " ".join(shlex.split(line.split("=", 1)[1])).split()
            return [w.replace("/var/lib/egress-auditor", str(state)) for w in words]
    raise AssertionError(f"no EGRESS_AUDITOR_OPTIONS in {ENV_FILE}")


def sandboxed(state: Path) -> list[str]:
    """A command prefix: the rest runs in a private mount namespace set up as the unit's."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", SANDBOX, "sandbox", str(state)]


@pytest.fixture(scope="module")
def service_cli() -> Iterator[list[str]]:
    """The tool copied under /var/lib, as installed under /opt: the sandbox hides /tmp, /home and
    /root, where a checkout may lie."""
    with copied_cli(Path("/var/lib")) as argv:
        yield argv


@pytest.fixture
def state() -> Iterator[Path]:
    # Under /var/lib, as the unit's: /tmp is replaced in the sandbox.
    path = Path(f"/var/lib/egress-auditor-test-{secrets.token_hex(3)}")
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path)


def test_a_trace_in_the_units_sandbox_records_and_writes_its_state_only(
    client_ns: Namespace, state: Path, tmp_path: Path, service_cli: list[str]
) -> None:
    port = random.randrange(20000, 60000)
    err_path = tmp_path / "stderr"
    outputs = service_options(state)
    assert "--resume" in outputs and "--snapshot-every" in outputs  # the service's own options, as installed
    proc = start_service(service_cli, client_ns, state, outputs, err_path)
    try:
        seen = False
        for attempt in range(5):  # the host may be busy with other tests: a lost event is retried
            client_ns.run([PYTHON, "-c", CONNECT, str(port + attempt)])
            deadline = time.monotonic() + 15
            while not seen and time.monotonic() < deadline:
                seen = f"127.0.0.1:{port + attempt} by python3" in err_path.read_text()
                time.sleep(0.05)
            if seen:
                port += attempt
                break
        assert seen, err_path.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    stderr = err_path.read_text()
    assert proc.returncode == 0, stderr
    assert "failed" not in stderr, stderr  # no output failed to write
    records = [json.loads(line) for line in (state / "capture.jsonl").read_text().splitlines()]
    flows = [r for r in records if r["type"] == "flow" and r["dst"] == "127.0.0.1" and r["dport"] == port]
    assert len(flows) == 1 and flows[0]["process"]["name"] == "python3", flows
    assert records[-1]["type"] == "summary"
    nft = (state / "egress.nft").read_text().splitlines()  # a rule, or a set element when there are many
    assert any("127.0.0.1" in line and re.search(rf"\b{port}\b", line) for line in nft), nft
    assert f"--dport {port} " in (state / "iptables" / "rules.v4").read_text()
    assert f"--dport {port} " in stdout  # the rules still end on stdout (the journal)
    assert sorted(p.name for p in state.iterdir()) == ["capture.jsonl", "egress.nft", "iptables"]

    # A restart resumes the capture: its rules still allow what the first run saw.
    again = tmp_path / "stderr-again"
    proc = start_service(service_cli, client_ns, state, outputs, again)
    try:
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, again.read_text()
    assert f"--dport {port} " in stdout and "resumed" in again.read_text(), again.read_text()
    kinds = [json.loads(line)["type"] for line in (state / "capture.jsonl").read_text().splitlines()]
    assert kinds.count("summary") == 2, kinds


def start_service(
    cli: list[str], client_ns: Namespace, state: Path, options: list[str], err_path: Path
) -> subprocess.Popen:
    """The trace as the unit runs it (sandbox, capabilities, options), once it says it is running."""
    proc = subprocess.Popen(
        [
            *["nsenter", f"--net=/run/netns/{client_ns.name}", *sandboxed(state)],
            *as_root_service(unit_capabilities()),
            *[*cli, "trace", "--no-live", "-I", "ebpf:max_flows:524288", *options],
        ],
        stdout=subprocess.PIPE,
        stderr=err_path.open("w"),
        text=True,
    )
    deadline = time.monotonic() + STARTUP_S
    while RUNNING_LINE not in err_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(err_path.read_text())
        time.sleep(0.05)
    return proc


def test_the_sandbox_refuses_writes_outside_the_state_directory(state: Path) -> None:
    """The emulation is real: an output pointed outside the state directory cannot write."""
    result = subprocess.run(
        [*sandboxed(state), "sh", "-c", PROBE, str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"  # a private, empty /tmp
    assert (state / "ok").exists() and not Path("/var/lib/.ea-outside").exists()
