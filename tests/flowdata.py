"""Hand-built connections, processes and summaries with fixed times, pids and
users, shared by the golden-file and injection tests."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from egress_auditor.capture.flows import FlowTable
from egress_auditor.model import Attribution, Connection, Family, Flow, Process, Summary, Transport

START = 1767225600.0  # 2026-01-01T00:00:00Z


def proc(
    pid: int | None,
    name: str,
    uid: int | None,
    user: str | None,
    cmdline: Sequence[str] = (),
    parent: Process | None = None,
    started: float | None = START - 600,
) -> Process:
    """A process read from /proc (started is set), or name-only (started None)."""
    return Process(
        pid=pid,
        name=name,
        uid=uid,
        user=user,
        exe=f"/usr/bin/{name}" if started is not None else None,
        cmdline=tuple(cmdline),
        start_time=started,
        parent=parent,
        attribution=Attribution.PROC if started is not None else Attribution.NAME_ONLY,
    )


def conn(
    process: Process, dst: str, dport: int, at: float, protocol: Transport = Transport.TCP, connections: int = 1
) -> Connection:
    address = ipaddress.ip_address(dst)
    family = Family.IPV4 if address.version == 4 else Family.IPV6
    src = ipaddress.ip_address("10.0.0.2" if family is Family.IPV4 else "fd00::2")
    return Connection(
        time=at,
        protocol=protocol,
        family=family,
        src=src,
        sport=40000 + process.pid % 1000 if process.pid is not None else None,
        dst=address,
        dport=dport,
        pid=process.pid,
        uid=process.uid if process.uid is not None else 65534,
        gid=process.uid if process.uid is not None else 65534,
        comm=process.name[:15],
        input="ebpf",
        process=process,
        connections=connections,
    )


def flows_of(connections: Iterable[Connection]) -> list[Flow]:
    table = FlowTable()
    for c in connections:
        table.add(c)
    return list(table)


def summary(connections: Sequence[Connection], lost: int = 0, map_full: int = 0) -> Summary:
    return Summary(
        started=START,
        ended=START + 90,
        host="testhost",
        inputs=["ebpf"],
        attach="kprobe tcp_v4_connect, tcp_v6_connect",
        connections=sum(c.connections for c in connections),
        events_lost=lost,
        map_full=map_full,
    )


SSHD = proc(900, "sshd", 0, "root", ["sshd: alice [priv]"])
BASH = proc(1200, "bash", 1000, "alice", ["-bash"], parent=SSHD)
CURL = proc(4242, "curl", 1000, "alice", ["curl", "-sS", "https://example.org/"], parent=BASH)
WGET = proc(
    4300,
    "wget",
    0,
    "root",
    ["wget", "-q", "-O", "-", "https://example.org/x y"],
    parent=proc(1, "systemd", 0, "root", ["/sbin/init"]),
)
SSH_GONE = proc(5100, "ssh", 1000, "alice", started=None)
APT = proc(
    5000,
    "http",
    42,
    "_apt",
    ["/usr/lib/apt/methods/http"],
    parent=proc(4990, "apt-get", 0, "root", ["apt-get", "update"]),
)
NTP = proc(700, "ntpd", 105, "ntp", ["/usr/sbin/ntpd", "-g"])
# Two name-only processes that tie on name and pid: their order must not follow the hash seed.
KERNEL_ROOT = proc(0, "kworker/u8:2", 0, "root", started=None)
KERNEL_WWW = proc(0, "kworker/u8:2", 33, "www-data", started=None)
ODD = proc(
    6000,
    'odd"name$(x)',
    1001,
    "bob",
    ["python3", "-c", "print('a\nb')", "--flag=%s", "caf\u00e9 \u202etxt.exe"],
    parent=proc(5999, "tmux: server", 1001, "bob", ["tmux", "new", "-s", "\x1b[2Jx"]),
)


def sample_connections() -> list[Connection]:
    """Two uids and two programs share 192.0.2.10:443; IPv6 and UDP; exited and odd processes."""
    return [
        conn(CURL, "192.0.2.10", 443, START + 1, connections=3),
        conn(WGET, "192.0.2.10", 443, START + 5),
        conn(CURL, "192.0.2.10", 80, START + 2),
        conn(SSH_GONE, "198.51.100.7", 22, START + 10),
        conn(NTP, "203.0.113.5", 123, START + 3, protocol=Transport.UDP, connections=2),
        conn(KERNEL_WWW, "192.0.2.20", 8080, START + 4),
        conn(KERNEL_ROOT, "192.0.2.20", 8080, START + 6),
        conn(APT, "2001:db8::1", 443, START + 20, connections=5),
        conn(CURL, "2001:db8::1", 443, START + 21),
        conn(APT, "2001:db8:0:1::53", 853, START + 30),
        conn(ODD, "192.0.2.30", 8443, START + 40),
    ]
