"""Rules: what a firewall output renders, one per (protocol, destination, port)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from egress_auditor.model import Evidence, Family, Flow, IPAddress, Process, Transport


@dataclass(frozen=True)
class Rule:
    protocol: Transport
    family: Family
    dst: IPAddress
    dport: int
    processes: tuple[Process, ...]
    first_seen: float
    last_seen: float
    connections: int
    hostnames: tuple[str, ...] = ()  # DNS names that led to dst, sorted
    evidence: Evidence | None = field(default=None, compare=False)  # where saved captures saw it
    prefix: int | None = None  # an aggregated rule allows dst/prefix; None: dst alone
    members: tuple[IPAddress, ...] = ()  # the addresses seen that an aggregated rule stands for

    @property
    def destination(self) -> str:
        """`192.0.2.10`, or `192.0.2.0/28` for an aggregated rule."""
        return f"{self.dst}/{self.prefix}" if self.prefix is not None else str(self.dst)

    @property
    def prefix_length(self) -> int:
        return self.prefix if self.prefix is not None else self.dst.max_prefixlen

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted({p.name for p in self.processes}))


def comment_text(rule: Rule) -> str:
    """What a rule's comment says, before escaping: `curl, wget svc.example.com`."""
    text = ", ".join(rule.names)
    return f"{text} {', '.join(rule.hostnames)}" if rule.hostnames else text


def _process_order(process: Process) -> tuple[str, str, int, str]:
    # repr breaks ties (same name and pid, other user): set order varies with the hash seed.
    return (process.name, process.command_line, process.pid or 0, repr(process))  # 0 sorts unknown first


def _evidence(flows: list[Flow]) -> Evidence | None:
    found = [f.evidence for f in flows if f.evidence is not None]
    if not found:
        return None
    merged = found[0]
    for more in found[1:]:
        merged |= more
    return merged


def rules_from_flows(flows: Iterable[Flow]) -> list[Rule]:
    """Merge flows that differ only in uid or process into one rule each; sorted."""
    grouped: dict[tuple[Transport, Family, IPAddress, int, int], list[Flow]] = {}
    for flow in flows:
        k = flow.key
        grouped.setdefault((k.protocol, k.family, k.dst, k.dport, k.prefix), []).append(flow)
    rules = []
    for (protocol, family, dst, dport, prefix), members in grouped.items():
        processes = {p for f in members for p in f.processes.values()}
        rules.append(
            Rule(
                protocol=protocol,
                family=family,
                dst=dst,
                dport=dport,
                processes=tuple(sorted(processes, key=_process_order)),
                first_seen=min(f.first_seen for f in members),
                last_seen=max(f.last_seen for f in members),
                connections=sum(f.connections for f in members),
                hostnames=tuple(sorted({h for f in members for h in f.hostnames})),
                evidence=_evidence(members),
                prefix=prefix or None,
            )
        )
    return sorted(rules, key=lambda r: (r.family, r.dst, r.protocol, r.dport, r.prefix_length))
