"""The event model every input produces and every output consumes."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Protocol(enum.IntEnum):
    TCP = 6
    UDP = 17


class Family(enum.IntEnum):
    IPV4 = 2
    IPV6 = 10

    @property
    def label(self) -> str:
        return "IPv4" if self is Family.IPV4 else "IPv6"


class Attribution(str, enum.Enum):
    """How the process behind a connection was identified."""

    KERNEL = "kernel"  # from process lineage recorded in the kernel (exec/fork/exit)
    PROC = "proc"  # read from /proc while the process was alive
    SOCKET = "socket"  # netfilter inputs: the packet's socket found in /proc/net and a process's fds
    NAME_ONLY = "name-only"  # the process had exited: only what the kernel gave


@dataclass(frozen=True)
class Process:
    """What is known about a process; parent is the same for its parent."""

    pid: int
    name: str
    uid: int | None = None
    user: str | None = None
    exe: str | None = None
    cmdline: tuple[str, ...] = ()
    start_time: float | None = None
    parent: Process | None = None
    attribution: Attribution = Attribution.NAME_ONLY
    gid: int | None = None
    cgroup: str | None = None  # cgroup v2 path, e.g. /system.slice/nginx.service
    service: str | None = None  # systemd unit or container, derived from the cgroup

    @property
    def command_line(self) -> str:
        return " ".join(self.cmdline)


@dataclass(frozen=True)
class Connection:
    """One observed outbound connection (or the first of a flow)."""

    time: float  # seconds since the epoch
    protocol: Protocol
    family: Family
    src: IPAddress | None
    sport: int  # 0 when the kernel had not chosen it yet
    dst: IPAddress
    dport: int
    pid: int
    uid: int
    gid: int
    comm: str  # the kernel's task name at connect time
    input: str
    process: Process
    repeats: int = 1  # connects this event stands for
    tid: int = 0  # the thread that connected (0: unknown)
    cgroup_id: int = 0  # the kernel's cgroup v2 id of the connecting task (0: unknown)
    hostname: str | None = None  # the DNS name asked for that gave dst, when known


@dataclass(frozen=True, order=True)
class FlowKey:
    """A flow: what a firewall rule is learned from."""

    protocol: Protocol
    family: Family
    dst: IPAddress
    dport: int
    uid: int
    comm: str


@dataclass
class Flow:
    key: FlowKey
    first_seen: float
    last_seen: float
    count: int = 0
    processes: dict[tuple[int, float | None], Process] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)
    hostnames: set[str] = field(default_factory=set)

    def add(self, conn: Connection) -> None:
        self.first_seen = min(self.first_seen, conn.time)
        self.last_seen = max(self.last_seen, conn.time)
        self.count += conn.repeats
        self.processes.setdefault((conn.process.pid, conn.process.start_time), conn.process)
        self.inputs.add(conn.input)
        if conn.hostname:
            self.hostnames.add(conn.hostname)


@dataclass
class Summary:
    """What a run saw, for headers and the final report."""

    started: float
    ended: float
    host: str
    inputs: list[str]
    attach: str  # the attach path(s) in use, for the header
    connects: int = 0
    events_lost: int = 0
    map_full: int = 0
