"""Network namespaces for tests: each test host is a namespace made here and
deleted afterwards, so no test touches the machine's own network or firewall."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

# Random subnets: test runs that overlap (and the tracer sees every
# namespace) must not share addresses, or their flows would merge.
_subnets = itertools.count(random.randrange(200 * 250))


@dataclass
class Namespace:
    name: str

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], check: bool = True, **kwargs: object) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.cmd(argv), check=check, **kwargs)  # type: ignore[call-overload]

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(argv), **kwargs)  # type: ignore[call-overload]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


@contextmanager
def namespace(label: str = "t") -> Iterator[Namespace]:
    ns = Namespace(f"ea-{label}-{uuid.uuid4().hex[:8]}")
    subprocess.run(["ip", "netns", "add", ns.name], check=True)
    try:
        # No duplicate address detection: a fresh link's addresses are usable at once.
        for scope in ("all", "default"):
            ns.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{scope}.accept_dad=0"])
        ns.run(["ip", "link", "set", "lo", "up"])
        yield ns
    finally:
        for pid in ns.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns.name], check=False)


@dataclass
class Link:
    """A veth pair: `a` is the client end, `b` the server end."""

    a: Namespace
    b: Namespace
    a4: str
    b4: str
    a6: str
    b6: str


def link(a: Namespace, b: Namespace) -> Link:
    """Join two namespaces with a veth pair carrying IPv4 and IPv6."""
    index = next(_subnets) % (200 * 250)
    second, n = 20 + index // 250, index % 250 + 1
    tag = uuid.uuid4().hex[:6]
    va, vb = f"ea{tag}a", f"ea{tag}b"
    subprocess.run(
        ["ip", "link", "add", va, "netns", a.name, "type", "veth", "peer", "name", vb, "netns", b.name], check=True
    )
    pair = Link(a, b, f"10.{second}.{n}.1", f"10.{second}.{n}.2", f"fd00:{second}:{n}::1", f"fd00:{second}:{n}::2")
    for ns, dev, v4, v6 in ((a, va, pair.a4, pair.a6), (b, vb, pair.b4, pair.b6)):
        ns.run(["ip", "addr", "add", f"{v4}/24", "dev", dev])
        ns.run(["ip", "addr", "add", f"{v6}/64", "dev", dev, "nodad"])
        ns.run(["ip", "link", "set", dev, "up"])
    for address in (pair.b4, pair.b6):
        wait_for_ping(a, address)
    return pair


def wait_for_ping(ns: Namespace, address: str, timeout: float = 15.0) -> None:
    """Until `address` answers from ns: a new veth (IPv6 above all) is not usable at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.run(["ping", "-c", "1", "-W", "1", address], check=False).returncode == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{address} does not answer from {ns.name}")


def wait_for_port(ns: Namespace, host: str, port: int, timeout: float = 30.0) -> None:
    """Wait until something listens on host:port inside ns."""
    deadline = time.monotonic() + timeout
    probe = "import socket,sys\ns=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1); s.close()"
    while time.monotonic() < deadline:
        if ns.run(["python3", "-c", probe, host, str(port)], check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} in {ns.name}")


@contextmanager
def http_server(ns: Namespace, port: int) -> Iterator[subprocess.Popen]:
    """A real HTTP server on every address of ns (IPv4 and IPv6)."""
    proc = ns.popen(
        ["python3", "-m", "http.server", "--bind", "::", str(port), "--directory", "/tmp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(ns, "::1", port)
        yield proc
    finally:
        proc.kill()
        proc.wait()
