"""Running `egress-auditor trace -i nflog|nfqueue` inside a test namespace, and
real clients there: what the netfilter kernel tests share.

The auditor runs under `ip netns exec`, so the rules its setup installs land in
the namespace, never in the machine's own firewall."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from netns import Namespace

EGRESS_AUDITOR = Path(sys.executable).with_name("egress-auditor")
RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
STARTUP_S = 20.0
TAG = re.compile(r"egress-auditor (nflog|nfqueue) pid=(\d+)")

# Sequential connections, each given time to succeed: prints {"ok": n, "failed": n, "slowest": s}.
STREAM_CLIENT = r"""
import json, socket, sys, time
host, port, count, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ok = failed = 0
slowest = 0.0
deadline = time.monotonic() + 120
for i in range(count):
    if time.monotonic() > deadline:
        break
    began = time.monotonic()
    try:
        s = socket.create_connection((host, port), timeout=10)
        s.close()
        ok += 1
    except OSError:
        failed += 1
    slowest = max(slowest, time.monotonic() - began)
    time.sleep(pause)
print(json.dumps({"ok": ok, "failed": failed, "slowest": slowest}))
"""

# Connects and holds the socket a while, so its process can be found through it.
HOLDING_CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
time.sleep(float(sys.argv[3]))
s.close()
"""

# UDP datagrams to `count` ports in a tight loop (each a new conntrack entry), then one more after a pause.
UDP_BURST = r"""
import socket, sys, time
host, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(first, first + count):
    s.sendto(b"x", (host, port))
time.sleep(1.0)
s.sendto(b"x", (host, first + count))
"""


class Auditor:
    """`egress-auditor trace --no-live ...` in a namespace, stderr read line by line as it comes."""

    def __init__(self, ns: Namespace, args: Sequence[str]) -> None:
        self.proc = ns.popen(
            [str(EGRESS_AUDITOR), "trace", "--no-live", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        self.stdout = ""
        self._running = threading.Event()
        self._readers = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]  # fmt: skip
        for reader in self._readers:
            reader.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            if line.rstrip("\n") == RUNNING_LINE:
                self._running.set()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()

    @property
    def attach_line(self) -> str:
        """The input's start-up line (a note on the cgroup v2 mount may come before it)."""
        return next((line for line in self.stderr if " input attached: " in line), "")

    def wait_running(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while not self._running.wait(0.1):
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}): {self.stderr}"
            assert time.monotonic() < deadline, f"not running after {STARTUP_S}s: {self.stderr}"

    def wait_line(self, pattern: str, timeout: float = 10.0) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stderr):
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s: {self.stderr}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.proc.send_signal(signum)
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not stop within {timeout}s: {self.stderr}") from None
        for reader in self._readers:
            reader.join(timeout=5)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def tagged_iptables(ns: Namespace) -> list[str]:
    """Our tagged rules in the namespace's iptables and ip6tables (mangle table)."""
    lines = []
    for binary in ("iptables", "ip6tables"):
        lines += [line for line in ns.run([binary, "-t", "mangle", "-S"]).stdout.splitlines() if TAG.search(line)]
    return lines


def nft_tables(ns: Namespace) -> list[str]:
    return [line for line in ns.run(["nft", "list", "tables"]).stdout.splitlines() if "egress_auditor_" in line]


def stream(ns: Namespace, host: str, port: int, count: int, pause: float) -> subprocess.Popen:
    return ns.popen([sys.executable, "-c", STREAM_CLIENT, host, str(port), str(count), str(pause)],
                    stdout=subprocess.PIPE, text=True)  # fmt: skip


def stream_result(proc: subprocess.Popen, timeout: float = 150.0) -> dict[str, float]:
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out)


def summary_numbers(stderr: Sequence[str]) -> tuple[int, int, int]:
    """(flows, connections, events lost) from the closing `stopped (...)` line."""
    for line in stderr:
        match = re.search(r"stopped \(.*\): (\d+) flows, (\d+) connections, (\d+) events lost", line)
        if match:
            return int(match.group(1)), int(match.group(2)), int(match.group(3))
    raise AssertionError(f"no closing line: {stderr}")


NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


def start_auditor(auditors: list[Auditor], ns: Namespace, input_name: str, *args: str) -> Auditor:
    """An auditor with `-i input_name` in ns, once it says it is running; killed by the `auditors` fixture."""
    auditors.append(Auditor(ns, ["-i", input_name, *args]))
    auditors[-1].wait_running()
    return auditors[-1]


def curl(ns: Namespace, url: str, *prefix: str) -> int:
    return ns.run([*prefix, "curl", "-sS", "-o", "/dev/null", "--max-time", "5", url], check=False).returncode


def flow_line(host: str, port: int, protocol: str = "TCP") -> str:
    endpoint = re.escape(f"[{host}]" if ":" in host else host)
    return rf"^new {protocol} connection (?:\S+ )?-> {endpoint}:{port}\b"
