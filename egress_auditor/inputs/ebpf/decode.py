"""Kernel records into the event model: addresses, names and the flow map's
keys as the BPF programs wrote them (bpf/events.h)."""

from __future__ import annotations

import ctypes
import ipaddress
import sys
from typing import Any

from egress_auditor.model import Family

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
