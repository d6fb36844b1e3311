"""The event model every input produces and every output consumes."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Transport(enum.IntEnum):
    """The transport protocol of a connection, by its IP protocol number."""

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


@dataclass(frozen=True, slots=True)
class Process:
    """What is known about a process; parent is the same for its parent. None is unknown, everywhere."""

    pid: int | None
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
    protocol: Transport
    family: Family
    src: IPAddress | None
    sport: int | None  # None: the kernel had not chosen it yet
    dst: IPAddress
    dport: int
    pid: int | None
    uid: int
    gid: int | None
    comm: str  # the kernel's task name at connect time
    input: str
    process: Process
    connections: int = 1  # connections this event stands for
    tid: int | None = None  # the thread that connected
    cgroup_id: int | None = None  # the kernel's cgroup v2 id of the connecting task
    hostname: str | None = None  # the DNS name asked for that gave dst, when known


@dataclass(frozen=True, order=True, slots=True)
class FlowKey:
    """A flow: what a firewall rule is learned from."""

    protocol: Transport
    family: Family
    dst: IPAddress
    dport: int
    uid: int
    comm: str
    prefix: int = 0  # past the flow cap (flows.py): dst is the network of this length; 0: dst alone


K = TypeVar("K")
V = TypeVar("V")
_NONE: Any = object()  # marks an empty slot: None may be an item


class FewMap(MutableMapping[K, V]):
    """A dict that keeps a single entry without a hash table: a flow usually
    has one process, and a dict of one entry costs 224 bytes."""

    __slots__ = ("_key", "_more", "_value")

    def __init__(self, items: Iterable[tuple[K, V]] = ()) -> None:
        self._key: Any = _NONE
        self._value: Any = None
        self._more: dict[K, V] | None = None  # every entry, once there are several
        for key, value in items:
            self[key] = value

    def __getitem__(self, key: K) -> V:
        if self._more is not None:
            return self._more[key]
        if self._key is not _NONE and self._key == key:
            return self._value  # type: ignore[no-any-return]
        raise KeyError(key)

    def __setitem__(self, key: K, value: V) -> None:
        if self._more is not None:
            self._more[key] = value
        elif self._key is _NONE or self._key == key:
            self._key, self._value = key, value
        else:
            self._more = {self._key: self._value, key: value}
            self._key, self._value = _NONE, None

    def __delitem__(self, key: K) -> None:
        if self._more is not None:
            del self._more[key]
        elif self._key is not _NONE and self._key == key:
            self._key, self._value = _NONE, None
        else:
            raise KeyError(key)

    def __iter__(self) -> Iterator[K]:
        if self._more is not None:
            return iter(self._more)
        return iter(() if self._key is _NONE else (self._key,))

    def __len__(self) -> int:
        return len(self._more) if self._more is not None else int(self._key is not _NONE)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


@dataclass(frozen=True)
class Evidence:
    """Where saved captures saw a flow (or a rule): for review across hosts and runs."""

    hosts: frozenset[str]
    runs: frozenset[str]
    startup_only: bool  # in every run that saw it, only within the run's first minute
    all_hosts: int  # hosts in all the captures read, seen there or not

    def __or__(self, other: Evidence) -> Evidence:
        return Evidence(
            self.hosts | other.hosts,
            self.runs | other.runs,
            self.startup_only and other.startup_only,
            max(self.all_hosts, other.all_hosts),
        )


@dataclass(slots=True)
class Flow:
    """Held for every flow of a run: kept small (slots, FewMap, shared input sets, a tuple of names)."""

    key: FlowKey
    first_seen: float
    last_seen: float
    connections: int = 0
    processes: MutableMapping[tuple[int, float | None], Process] = field(default_factory=FewMap)
    inputs: frozenset[str] = frozenset()  # one shared set per combination (_shared_inputs)
    hostnames: tuple[str, ...] = ()
    evidence: Evidence | None = None  # only for flows read back from captures

    def add(self, conn: Connection, process_key: tuple[int, float | None] | None = None) -> None:
        """Record a connection; process_key, when given, is (pid, start time) of conn.process, shared."""
        if process_key is None:
            process_key = (conn.process.pid, conn.process.start_time)
        self.processes.setdefault(process_key, conn.process)
        self.count_connection(conn)

    def count_connection(self, conn: Connection) -> None:
        """A connection's times, connections, input and DNS name, without listing its process."""
        self.first_seen = min(self.first_seen, conn.time)
        self.last_seen = max(self.last_seen, conn.time)
        self.connections += conn.connections
        if conn.input not in self.inputs:
            self.add_inputs((conn.input,))
        if conn.hostname and conn.hostname not in self.hostnames:
            self.add_hostnames((conn.hostname,))

    def add_inputs(self, names: Iterable[str]) -> None:
        self.inputs = _shared_inputs(self.inputs.union(names))

    def add_hostnames(self, names: Iterable[str]) -> None:
        self.hostnames = tuple(dict.fromkeys((*self.hostnames, *names)))


_INPUT_SETS: dict[frozenset[str], frozenset[str]] = {}


def _shared_inputs(inputs: frozenset[str]) -> frozenset[str]:
    # A run has a few inputs, so a few combinations: each flow points at a shared one.
    return _INPUT_SETS.setdefault(inputs, inputs)


@dataclass
class Summary:
    """What a run saw, for headers and the final report."""

    started: float
    ended: float
    host: str
    inputs: list[str]
    attach: str  # the attach path(s) in use, for the header
    connections: int = 0
    events_lost: int = 0
    map_full: int = 0
    notes: list[str] = field(default_factory=list)  # more header lines, e.g. what a review left out
