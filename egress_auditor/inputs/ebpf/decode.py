"""Kernel records into the event model: connect events, the flow map's keys and
their addresses and names, as the BPF programs wrote them (bpf/events.h)."""

from __future__ import annotations

import ctypes
import ipaddress
import sys
from typing import Any

from egress_auditor.model import Connection, Family, FlowKey, Process, Transport

EVENT_NEW_FLOW, EVENT_MAP_FULL = 1, 2  # bpf/events.h: EA_EVENT_*
STAT_EVENTS_LOST, STAT_MAP_FULL = 0, 1  # bpf/events.h: EA_STAT_*
FLOW_KEY_FIELDS = ("daddr", "uid", "dport", "family", "protocol", "comm")


def to_address(family: int, raw: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    data = bytes(raw)
    return ipaddress.IPv4Address(data[:4]) if family == Family.IPV4 else ipaddress.IPv6Address(data[:16])


def copy_field(dst: Any, src: Any, name: str) -> None:
    """Copy field `name` between two BCC-built ctypes structs, byte for byte (char arrays included)."""
    to, frm = getattr(type(dst), name), getattr(type(src), name)
    ctypes.memmove(ctypes.addressof(dst) + to.offset, ctypes.addressof(src) + frm.offset, min(to.size, frm.size))


def decode_comm(raw: bytes) -> str:
    # Interned: every flow of a process keeps its name, and one string serves them all.
    return sys.intern(raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace"))


class Decoder:
    """The records of one loaded BPF object: connect events and flow map keys (`key_type`, the
    flow map's BCC-built key struct) into Connection and FlowKey values, times on the wall clock."""

    def __init__(self, key_type: Any, input_name: str, epoch_offset: float) -> None:
        self._key_type = key_type
        self._input_name = input_name
        self._epoch_offset = epoch_offset  # bpf_ktime_get_ns() is CLOCK_MONOTONIC: this maps it to wall time
        self._ports: dict[int, int] = {}  # one int object per port number, shared by its flows

    def wall_time(self, ns: int) -> float:
        return ns / 1e9 + self._epoch_offset

    def _port(self, port: int) -> int:
        return self._ports.setdefault(port, port)

    def raw_key(self, event: Any) -> bytes:
        """The flow map's key for an event, as the kernel built it (same fields, zeroed padding)."""
        key = self._key_type()
        for name in FLOW_KEY_FIELDS:
            copy_field(key, event, name)
        return bytes(key)

    def flow_key(self, raw: bytes) -> FlowKey:
        """The flow of a flow map key, as the kernel built it."""
        key = self._key_type.from_buffer_copy(raw)
        family = Family(key.family)
        dst = to_address(family, key.daddr)
        comm = decode_comm(bytes(key.comm))
        return FlowKey(Transport(key.protocol), family, dst, self._port(key.dport), key.uid, comm)

    def connection(self, event: Any) -> Connection:
        """A connect event (struct ea_connect_event)."""
        family = Family(event.family)
        comm = decode_comm(bytes(event.comm))
        src = to_address(family, event.saddr)
        return Connection(
            time=self.wall_time(event.ts_ns),
            protocol=Transport(event.protocol),
            family=family,
            src=None if src.is_unspecified else src,
            sport=event.sport or None,  # 0: not chosen yet at this hook
            dst=to_address(family, event.daddr),
            dport=self._port(event.dport),
            pid=event.pid or None,
            uid=event.uid,
            gid=event.gid,
            comm=comm,
            input=self._input_name,
            process=Process(pid=event.pid or None, name=comm, uid=event.uid),
            tid=event.tid or None,
            cgroup_id=event.cgroup_id or None,
        )

    def recovered(self, raw: bytes, first_ns: int) -> Connection:
        """A flow whose event was lost, from its flow map key: no process beyond name and uid."""
        flow = self.flow_key(raw)
        return Connection(
            time=self.wall_time(first_ns),
            protocol=flow.protocol,
            family=flow.family,
            src=None,
            sport=None,
            dst=flow.dst,
            dport=flow.dport,
            pid=None,
            uid=flow.uid,
            gid=None,
            comm=flow.comm,
            input=self._input_name,
            process=Process(pid=None, name=flow.comm, uid=flow.uid),
        )
