"""FlowTable: merges connections into flows, with counts folded from the kernel.

Memory is bounded for runs of weeks (docs/decisions/flow-cap.md): past `cap`
flows, a new destination is held in the flow of its /24 (IPv6 /64) network,
past 1.5 x cap in its /16 (/48), and past 2 x cap it is only counted. A flow
lists at most PROCESSES_PER_FLOW processes, and past PROCESS_CAP processes
held in all, a flow that has one gets no more.
"""

from __future__ import annotations

import dataclasses
import heapq
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

from egress_auditor.model import Connection, Family, Flow, FlowKey, Process

FLOW_CAP = 262_144  # flows held with their own destination: about 110 MB of Python objects
PROCESSES_PER_FLOW = 32
PROCESS_CAP = 65_536
# (IPv4, IPv6) prefix lengths that destinations past the cap are held in, from the cap and from 1.5 x cap.
MERGE_LEVELS = ((24, 64), (16, 48))


def flow_key(conn: Connection) -> FlowKey:
    return FlowKey(conn.protocol, conn.family, conn.dst, conn.dport, conn.uid, conn.comm)


def network_key(key: FlowKey, v4: int, v6: int) -> FlowKey:
    """The key of the flow that holds `key` in its network of that length."""
    length = v4 if key.family is Family.IPV4 else v6
    network = ipaddress.ip_network((key.dst, length), strict=False).network_address
    return dataclasses.replace(key, dst=network, prefix=length)


@dataclass
class Limits:
    """What the caps took from a run: the rules' header says so."""

    merged_flows: int = 0  # network flows made for destinations past the cap
    unheld_connections: int = 0  # connections past the hard limit: counted, in no flow
    unlisted_processes: int = 0  # processes not listed on a flow that has others

    def notes(self, cap: int) -> list[str]:
        notes = []
        if self.merged_flows:
            notes.append(
                f"past the flow cap ({cap}), new destinations are held in {self.merged_flows} network flows "
                "(/24 or /16; IPv6 /64 or /48): the json capture keeps the first address of each"
            )
        if self.unheld_connections:
            notes.append(
                f"WARNING: {self.unheld_connections} connections past twice the flow cap ({2 * cap}) are in no rule: "
                "these rules are incomplete; raise --flow-cap or rebuild them with rules --from the capture"
            )
        if self.unlisted_processes:
            notes.append(
                f"{self.unlisted_processes} processes are not listed on their flows "
                f"(at most {PROCESSES_PER_FLOW} a flow, {PROCESS_CAP} in all)"
            )
        return notes


class FlowTable:
    def __init__(self, cap: int = FLOW_CAP) -> None:
        self.cap = cap
        self.limits = Limits()
        self._flows: dict[FlowKey, Flow] = {}
        # Equal processes (and their keys in Flow.processes) are held once: flows
        # recovered from the kernel map or given a cgroup each arrive with a copy.
        self._processes: dict[Process, tuple[tuple[int, float | None], Process]] = {}
        self._connections = 0  # kept as it changes: the display asks for it often

    def holder(self, key: FlowKey) -> FlowKey | None:
        """The key of the flow that holds `key`'s connections (itself below the cap); None: none may."""
        flows = self._flows
        if key in flows or len(flows) < self.cap:
            return key
        for level, (v4, v6) in enumerate(MERGE_LEVELS):
            wider = network_key(key, v4, v6)
            if wider in flows or len(flows) < self.cap + self.cap * (level + 1) // 2:
                return wider
        return None

    def add(self, conn: Connection) -> tuple[Flow | None, bool]:
        """Record a connection; returns its flow (None past the hard limit) and whether the flow is new."""
        exact = flow_key(conn)
        key = self.holder(exact)
        self._connections += conn.connections
        if key is None:
            self.limits.unheld_connections += conn.connections
            return None, False
        flow = self._flows.get(key)
        is_new = flow is None
        if flow is None:
            flow = self._flows[key] = Flow(key, conn.time, conn.time)
        if key is not exact and is_new:
            self.limits.merged_flows += 1
        process = self._held_process(conn.process, flow)
        if process is None:
            flow.count_connection(conn)
            return flow, is_new
        if process[1] is not conn.process:
            conn = dataclasses.replace(conn, process=process[1])
        flow.add(conn, process[0])
        return flow, is_new

    def _held_process(self, process: Process, flow: Flow) -> tuple[tuple[int, float | None], Process] | None:
        """The shared copy of `process` and its key, or None if the flow does not list it."""
        known = self._processes.get(process)
        if known is not None:
            if len(flow.processes) < PROCESSES_PER_FLOW or known[0] in flow.processes:
                return known
        elif not flow.processes or (len(flow.processes) < PROCESSES_PER_FLOW and len(self._processes) < PROCESS_CAP):
            known = self._processes[process] = ((process.pid, process.start_time), process)
            return known
        self.limits.unlisted_processes += 1
        return None

    def add_kernel_count(self, key: FlowKey, added: int, last_seen: float) -> None:
        """Add connections the kernel counted for a flow beyond those its events carried."""
        held = self.holder(key)
        flow = self._flows.get(held) if held is not None else None
        self._connections += added
        if flow is None:
            self.limits.unheld_connections += added
            return
        flow.connections += added
        flow.last_seen = max(flow.last_seen, last_seen)

    def set_kernel_count(self, key: FlowKey, count: int, last_seen: float) -> None:
        """Fold a flow's whole count as a saved capture gives it (it only grows)."""
        held = self.holder(key)
        flow = self._flows.get(held) if held is not None else None
        if flow is not None and count > flow.connections:
            self._connections += count - flow.connections
            flow.connections = count
        if flow is not None:
            flow.last_seen = max(flow.last_seen, last_seen)

    def put(self, flow: Flow) -> Flow:
        """A flow read back whole (a capture's totals): the one held under its key."""
        return self._flows.setdefault(flow.key, flow)

    def discard(self, key: FlowKey) -> None:
        flow = self._flows.pop(key, None)
        if flow is not None:
            self._connections -= flow.connections

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
    def connections(self) -> int:
        return self._connections
