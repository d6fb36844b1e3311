"""FlowTable: merges connections into flows, with counts folded from the kernel."""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterator

from egress_auditor.model import Connection, Flow, FlowKey, Process


def flow_key(conn: Connection) -> FlowKey:
    return FlowKey(conn.protocol, conn.family, conn.dst, conn.dport, conn.uid, conn.comm)


class FlowTable:
    def __init__(self) -> None:
        self._flows: dict[FlowKey, Flow] = {}
        # Equal processes (and their keys in Flow.processes) are held once: flows
        # recovered from the kernel map or given a cgroup each arrive with a copy.
        self._processes: dict[Process, tuple[tuple[int, float | None], Process]] = {}
        self._connects = 0  # kept as it changes: the display asks for it often

    def add(self, conn: Connection) -> tuple[Flow, bool]:
        """Record a connection; returns its flow and whether the flow is new."""
        key = flow_key(conn)
        flow = self._flows.get(key)
        is_new = flow is None
        if flow is None:
            flow = self._flows[key] = Flow(key, conn.time, conn.time)
        known = self._processes.get(conn.process)
        if known is None:
            known = self._processes[conn.process] = ((conn.process.pid, conn.process.start_time), conn.process)
        elif known[1] is not conn.process:
            conn = dataclasses.replace(conn, process=known[1])
        flow.add(conn, known[0])
        self._connects += conn.repeats
        return flow, is_new

    def add_kernel_count(self, key: FlowKey, added: int, last_seen: float) -> None:
        """Add connects the kernel counted for a flow beyond those its events carried."""
        flow = self._flows.get(key)
        if flow is not None:
            flow.count += added
            self._connects += added
            flow.last_seen = max(flow.last_seen, last_seen)

    def set_kernel_count(self, key: FlowKey, count: int, last_seen: float) -> None:
        """Fold a flow's whole count as a saved capture gives it (it only grows)."""
        flow = self._flows.get(key)
        if flow is not None and count > flow.count:
            self._connects += count - flow.count
            flow.count = count
        if flow is not None:
            flow.last_seen = max(flow.last_seen, last_seen)

    def get(self, key: FlowKey) -> Flow | None:
        return self._flows.get(key)

    def __contains__(self, key: FlowKey) -> bool:
        return key in self._flows

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(sorted(self._flows.values(), key=lambda f: f.key))

    def recent(self, limit: int) -> list[Flow]:
        """The `limit` flows seen most recently, newest first."""
        return heapq.nlargest(limit, self._flows.values(), key=lambda f: f.last_seen)

    @property
    def connects(self) -> int:
        return self._connects
