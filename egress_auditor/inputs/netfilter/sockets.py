"""Which process owns the socket a packet left from:
the socket's inode from /proc/net/{tcp,tcp6,udp,udp6}, then the process
holding that inode among /proc/*/fd.

Netfilter tells the uid and gid of a packet's socket but not its process.
This is best effort: a connection that is over before its packet is read
(a fast loopback connect and close) has left the socket table, and is
reported with its uid only. What was found is cached: inode to pid, and the
pids that owned sockets before are searched first, since a process that
connected once usually connects again.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from egress_auditor.inputs.netfilter.packets import Packet
from egress_auditor.model import Family, IPAddress, Transport

TCP_LISTEN = 0x0A
_TABLES = {
    (Transport.TCP, Family.IPV4): "tcp",
    (Transport.TCP, Family.IPV6): "tcp6",
    (Transport.UDP, Family.IPV4): "udp",
    (Transport.UDP, Family.IPV6): "udp6",
}


@dataclass(frozen=True)
class SocketEntry:
    """One line of /proc/net/{tcp,udp}{,6}."""

    local: IPAddress
    lport: int
    remote: IPAddress
    rport: int
    state: int
    uid: int
    inode: int


@dataclass(frozen=True)
class SocketOwner:
    pid: int
    comm: str
    uid: int  # the socket's owner from the socket table
    inode: int


def _address(text: str) -> IPAddress:
    """/proc/net prints each 32-bit word of an address as a host-order hex number."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)


def parse_table(lines: Iterable[str], ports: set[int] | None = None) -> list[SocketEntry]:
    """Entries of a /proc/net socket table, only those with a local port in `ports` when given."""
    entries = []
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or ":" not in fields[1] or fields[0] == "sl":
            continue
        local, lport_hex = fields[1].rsplit(":", 1)
        lport = int(lport_hex, 16)
        if ports is not None and lport not in ports:
            continue
        remote, rport_hex = fields[2].rsplit(":", 1)
        try:
            entries.append(
                SocketEntry(
                    _address(local),
                    lport,
                    _address(remote),
                    int(rport_hex, 16),
                    int(fields[3], 16),
                    int(fields[7]),
                    int(fields[9]),
                )
            )
        except ValueError:
            continue
    return entries


def _same(address: IPAddress, wanted: IPAddress) -> bool:
    if address == wanted:
        return True
    # A dual-stack IPv6 socket talking IPv4 shows its addresses as ::ffff:a.b.c.d.
    return isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped == wanted


def match(entries: Sequence[SocketEntry], packet: Packet) -> SocketEntry | None:
    """The socket that sent `packet`: connected to its destination, or (UDP) unconnected on its port."""
    best = None
    for entry in entries:
        if entry.lport != packet.sport or entry.inode == 0 or entry.state == TCP_LISTEN:
            continue
        if not (_same(entry.local, packet.src) or entry.local.is_unspecified):
            continue
        if entry.rport == packet.dport and _same(entry.remote, packet.dst):
            return entry
        if packet.protocol is Transport.UDP and entry.rport == 0 and entry.remote.is_unspecified:
            best = entry  # sendto() on an unconnected socket: the port alone says whose it is
    return best


class SocketTable:
    def __init__(
        self,
        proc: Path = Path("/proc"),
        max_inodes: int = 65536,
        recent_pids: int = 64,
        scan_share: float = 0.25,
    ) -> None:
        self.proc = proc
        self._owners: OrderedDict[int, int] = OrderedDict()  # socket inode -> pid
        self._recent: OrderedDict[int, None] = OrderedDict()  # pids that owned a matched socket
        self._max_inodes = max_inodes
        self._max_recent = recent_pids
        self._scan_share = scan_share
        self._next_full_scan = 0.0
        self.found = 0
        self.missed = 0  # the socket had gone, or no process held it any more

    # -- socket tables ------------------------------------------------------------
    def entries(self, packets: Sequence[Packet]) -> dict[str, list[SocketEntry]]:
        """Each table the packets need, read once for the whole batch."""
        wanted: dict[str, set[int]] = {}
        for packet in packets:
            wanted.setdefault(_TABLES[(packet.protocol, packet.family)], set()).add(packet.sport)
            if packet.family is Family.IPV4:  # dual-stack IPv6 sockets send IPv4 too
                wanted.setdefault(_TABLES[(packet.protocol, Family.IPV6)], set()).add(packet.sport)
        tables = {}
        for name, ports in wanted.items():
            try:
                with open(self.proc / "net" / name, encoding="ascii") as table:
                    tables[name] = parse_table(table, ports)
            except OSError:
                tables[name] = []
        return tables

    def owners(self, packets: Sequence[Packet]) -> list[SocketOwner | None]:
        """The owner of each packet's socket, or None where it can no longer be found."""
        tables = self.entries(packets)
        result: list[SocketOwner | None] = []
        for packet in packets:
            entry = match(tables.get(_TABLES[(packet.protocol, packet.family)], []), packet)
            if entry is None and packet.family is Family.IPV4:
                entry = match(tables.get(_TABLES[(packet.protocol, Family.IPV6)], []), packet)
            owner = self._owner(entry) if entry is not None else None
            if owner is None:
                self.missed += 1
            else:
                self.found += 1
            result.append(owner)
        return result

    # -- inode to process ---------------------------------------------------------
    def _owner(self, entry: SocketEntry) -> SocketOwner | None:
        pid = self._owners.get(entry.inode)
        if pid is None or not self._holds(pid, entry.inode):
            pid = self._search(entry.inode, entry.uid)
        if pid is None:
            return None
        self._recent[pid] = None
        self._recent.move_to_end(pid)
        if len(self._recent) > self._max_recent:
            self._recent.popitem(last=False)
        try:
            comm = (self.proc / str(pid) / "comm").read_text().rstrip("\n")
        except OSError:
            return None
        return SocketOwner(pid, comm, entry.uid, entry.inode)

    def _holds(self, pid: int, inode: int) -> bool:
        return inode in self._socket_inodes(pid)

    def _socket_inodes(self, pid: int) -> set[int]:
        """The socket inodes among a process's open files; records each in the cache."""
        inodes = set()
        fd_dir = f"{self.proc}/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            return inodes
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                inodes.add(inode)
                self._owners[inode] = pid
        while len(self._owners) > self._max_inodes:
            self._owners.popitem(last=False)
        return inodes

    def _search(self, inode: int, uid: int) -> int | None:
        for pid in reversed(self._recent):
            if inode in self._socket_inodes(pid):
                return pid
        began = time.monotonic()
        if began < self._next_full_scan:
            return None
        try:
            return self._full_scan(inode, uid)
        finally:
            # A full scan costs milliseconds: never spend more than scan_share of the time on them.
            self._next_full_scan = time.monotonic() + (time.monotonic() - began) / self._scan_share

    def _full_scan(self, inode: int, uid: int) -> int | None:
        others = []
        for pid in self._pids():
            try:
                owner = os.stat(f"{self.proc}/{pid}").st_uid
            except OSError:
                continue
            if owner != uid:
                others.append(pid)  # a socket passed to another user's process: looked at last
            elif inode in self._socket_inodes(pid):
                return pid
        for pid in others:
            if inode in self._socket_inodes(pid):
                return pid
        return None

    def _pids(self) -> list[int]:
        try:
            return [int(name) for name in os.listdir(self.proc) if name.isdigit()]
        except OSError:
            return []
