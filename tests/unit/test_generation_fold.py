"""How the eBPF input settles a taken generation of the flow map, without a kernel: the
generation's raw entries, the events read, and what reaches emit() and on_count().

The kernel side (flips, exact counts from real connects) is in tests/kernel/test_ebpf_input.py;
here the bookkeeping: which keys lost their event, what is added to whose count, and when."""

from __future__ import annotations

import ctypes
import ipaddress
import time
from typing import Any

from egress_auditor.inputs.ebpf import PLUGIN, EbpfInput
from egress_auditor.model import Connection, FlowKey


class Key(ctypes.Structure):  # struct ea_flow_key
    _fields_ = [
        ("daddr", ctypes.c_ubyte * 16),
        ("uid", ctypes.c_uint32),
        ("dport", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("comm", ctypes.c_char * 16),
    ]


class Leaf(ctypes.Structure):  # struct ea_flow_stats
    _fields_ = [(name, ctypes.c_uint64) for name in ("count", "first_ns", "last_ns", "fp", "fp2")]


class Event(ctypes.Structure):  # struct ea_connect_event
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 2),
        ("epoch", ctypes.c_uint32),
        ("saddr", ctypes.c_ubyte * 16),
        ("daddr", ctypes.c_ubyte * 16),
        ("comm", ctypes.c_char * 16),
    ]


class Table:
    Key, Leaf = Key, Leaf

    def __init__(self) -> None:
        self.entries: list[tuple[Key, Leaf]] = []

    def event(self, data: Any) -> Event:
        return data  # the tests hand events over as they are


class Stats:
    lost = 0

    def sum(self, _slot: int) -> ctypes.c_uint64:
        return ctypes.c_uint64(self.lost)


class Gens:
    """Two generations without a kernel: flip() hands over the live one."""

    def __init__(self) -> None:
        self.tables = [Table(), Table()]
        self.live, self.epoch = 0, 1

    def flip(self) -> tuple[Table, int]:
        old, epoch = self.tables[self.live], self.epoch
        self.live ^= 1
        self.epoch += 1
        return old, epoch


def key(port: int) -> Key:
    k = Key(uid=0, dport=port, family=2, protocol=6, comm=b"client")
    k.daddr[:4] = list(ipaddress.IPv4Address("192.0.2.7").packed)
    return k


def event(port: int, epoch: int) -> Event:
    e = Event(ts_ns=time.monotonic_ns(), pid=4242, tid=4242, uid=0, flags=1, dport=port, family=2, protocol=6)
    e.daddr[:4] = list(ipaddress.IPv4Address("192.0.2.7").packed)
    e.comm, e.epoch = b"client", epoch
    return e


class Harness:
    """An EbpfInput whose kernel is a few Python objects; events "arrive" when poll() reads."""

    def __init__(self) -> None:
        self.input = ebpf_input = EbpfInput(PLUGIN.defaults())
        self.gens = Gens()
        self.stats = Stats()
        self.arriving: list[Event] = []
        self.emitted: list[Connection] = []
        self.added: dict[int, int] = {}
        ebpf_input.bpf = {"flows": Table(), "events": Table(), "stats": self.stats}
        ebpf_input.plan = object()  # type: ignore[assignment]
        ebpf_input._bind(self.gens)  # type: ignore[arg-type]
        assert ebpf_input._ledger is not None
        self.ledger = ebpf_input._ledger
        self.ledger._reader.take = self._take  # type: ignore[method-assign]
        ebpf_input._read_events = self._read_events  # type: ignore[method-assign]

    def _take(self, table: Table) -> list[tuple[bytes, bytes, int]]:
        chunk = (b"".join(bytes(k) for k, _ in table.entries), b"".join(bytes(v) for _, v in table.entries))
        n, table.entries = len(table.entries), []
        return [(*chunk, n)]

    def _read_events(self, _timeout_s: float) -> None:
        began = time.monotonic_ns()
        arriving, self.arriving = self.arriving, []
        for e in arriving:
            self.input._on_event(None, e, ctypes.sizeof(e))
        self.input._read_upto_ns = began

    def count(self, port: int, count: int, epoch_table: int | None = None) -> None:
        """The kernel counted `count` connects of this flow in the live generation."""
        table = self.gens.tables[self.gens.live if epoch_table is None else epoch_table]
        now = time.monotonic_ns()
        table.entries.append((key(port), Leaf(count=count, first_ns=now, last_ns=now)))

    def sync(self) -> None:
        def on_count(flow: FlowKey, added: int, _last: float) -> None:
            self.added[flow.dport] = self.added.get(flow.dport, 0) + added

        self.input.sync(self.emitted.append, on_count)

    def ports(self, recovered: bool) -> list[int]:
        return sorted(c.dport for c in self.emitted if (c.pid is None) == recovered)


def test_a_key_without_its_event_is_recovered_and_counts_add_beyond_the_first_connect() -> None:
    h = Harness()
    mark = (Key(), Leaf(count=1))  # the generation's mark: never a flow
    h.gens.tables[0].entries.append(mark)
    h.count(80, 5)  # its event arrives
    h.count(443, 3)  # its event was lost
    h.count(8080, 1)  # lost too, one connect
    h.arriving.append(event(80, epoch=1))
    h.stats.lost = 2
    h.sync()
    assert h.ports(recovered=False) == [80]
    assert h.ports(recovered=True) == [443, 8080]
    assert h.added == {80: 4, 443: 2}, "the event (or recovery) carried the first connect"
    h.sync()  # nothing new: nothing handed over again
    assert len(h.emitted) == 3 and h.added == {80: 4, 443: 2}


def test_a_flow_alive_across_flips_adds_up_exactly() -> None:
    h = Harness()
    total = 0
    for generation in range(5):
        h.count(80, 7)  # each generation: a new entry, a new event of its epoch
        h.arriving.append(event(80, epoch=h.gens.epoch))
        total += 7
        h.sync()
        assert generation + 1 == len(h.emitted)
    assert len(h.emitted) + h.added[80] == total
    assert h.ports(recovered=True) == []


def test_a_late_event_of_a_settled_generation_is_dropped() -> None:
    h = Harness()
    h.count(80, 2)
    h.sync()  # no event read by the flip: recovered
    assert h.ports(recovered=True) == [80]
    h.arriving.append(event(80, epoch=1))  # its record was behind one still being written
    h.input.poll(0, h.emitted.append)
    assert len(h.emitted) == 1, "that connect was the one recovered"
    assert h.added == {80: 1}


def test_a_generation_waits_until_the_events_are_read_past_its_flip() -> None:
    h = Harness()
    h.count(80, 1)
    h.ledger.flip()  # as poll() does when the generation fills
    h.ledger.settle(0)  # the ring not read since
    assert not h.ledger.recover and h.ledger.taken, "not settled: its event may still be in the ring"
    h.arriving.append(event(80, epoch=1))
    h.input.poll(0, h.emitted.append)
    assert h.ports(recovered=False) == [80] and h.ports(recovered=True) == []


def test_poll_flips_a_filling_generation_and_recoveries_follow_the_events() -> None:
    h = Harness()
    h.input.options = {**h.input.options, "max_flows": 8}
    for port in range(4):  # half of max_flows announced: the generation may be filling
        h.count(1000 + port, 1)
        h.arriving.append(event(1000 + port, epoch=1))
    h.count(2000, 1)  # no event: lost
    h.stats.lost = 1
    h.input.poll(0, h.emitted.append)
    assert h.gens.epoch == 2, "flipped from poll()"
    h.input.poll(0, h.emitted.append)
    assert h.ports(recovered=True) == [2000]
    assert h.ports(recovered=False) == [1000, 1001, 1002, 1003]
