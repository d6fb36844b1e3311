"""What a set of saved captures already covers, and what changed between two
sets: the destinations added and gone, for a code review of a policy.

A destination is (protocol, family, address, port), as a rule allows it. A
new address still counts as known when the old captures asked for the same
DNS name on the same protocol and port: CDNs rotate addresses.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from egress_auditor.model import Family, Flow, IPAddress, Transport
from egress_auditor.rules.provenance import stamp
from egress_auditor.rules.rule import Rule, rules_from_flows

Destination = tuple[Transport, Family, IPAddress, int]


def _within(address: IPAddress, rule: Rule) -> bool:
    return address.version == rule.dst.version and ipaddress.ip_network(rule.destination).supernet_of(
        ipaddress.ip_network(address)
    )


def destination(rule: Rule) -> Destination:
    return (rule.protocol, rule.family, rule.dst, rule.dport)


@dataclass
class Baseline:
    """The destinations of some captures, the names that led to them, and who reached each."""

    rules: dict[Destination, Rule]
    names: dict[tuple[Transport, int, str], set[IPAddress]]
    uids: dict[Destination, set[int]] = field(default_factory=dict)
    cgroups: dict[Destination, set[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, flows: Iterable[Flow]) -> Baseline:
        flows = list(flows)
        rules = {destination(r): r for r in rules_from_flows(flows)}
        names: dict[tuple[Transport, int, str], set[IPAddress]] = {}
        for rule in rules.values():
            for name in rule.hostnames:
                names.setdefault((rule.protocol, rule.dport, name.lower()), set()).add(rule.dst)
        uids: dict[Destination, set[int]] = {}
        cgroups: dict[Destination, set[str]] = {}
        for flow in flows:
            k = flow.key
            where = (k.protocol, k.family, k.dst, k.dport)
            uids.setdefault(where, set()).add(k.uid)
            cgroups.setdefault(where, set()).update(p.cgroup for p in flow.processes.values() if p.cgroup)
        return cls(rules, names, uids, cgroups)

    def destinations_of(self, protocol: Transport, family: Family, dst: IPAddress, port: int,
                        hostnames: Iterable[str]) -> list[Destination]:  # fmt: skip
        """The baseline's destinations that cover this one: itself, or those reached by one of its names."""
        found = [(protocol, family, dst, port)] if (protocol, family, dst, port) in self.rules else []
        for rule in self._networks:
            if (rule.protocol, rule.family, rule.dport) == (protocol, family, port) and _within(dst, rule):
                found.append(destination(rule))
        for name in hostnames:
            for old in self.names.get((protocol, port, name.lower()), ()):
                found.append((protocol, Family.IPV4 if old.version == 4 else Family.IPV6, old, port))
        return found

    def known_by_name(self, rule: Rule) -> list[tuple[str, list[IPAddress]]]:
        """The names of `rule` that the baseline asked for on its protocol and port, with their old addresses."""
        found = []
        for name in rule.hostnames:
            old = self.names.get((rule.protocol, rule.dport, name.lower()))
            if old:
                found.append((name, sorted(old)))
        return found

    def covers(self, rule: Rule) -> bool:
        if destination(rule) in self.rules or self.known_by_name(rule):
            return True
        return any(
            (net.protocol, net.family, net.dport) == (rule.protocol, rule.family, rule.dport)
            and net.prefix_length <= rule.prefix_length
            and _within(rule.dst, net)
            for net in self._networks
        )

    @functools.cached_property
    def _networks(self) -> list[Rule]:
        """Rules for a network (flows held past the flow cap): they cover every address inside."""
        return [r for r in self.rules.values() if r.prefix is not None]


@dataclass
class Diff:
    added: list[Rule]
    gone: list[Rule]
    readdressed: list[tuple[Rule, list[tuple[str, list[IPAddress]]]]]  # new address, known name

    @property
    def changed(self) -> bool:
        return bool(self.added or self.gone)


def diff(old: Iterable[Flow], new: Iterable[Flow]) -> Diff:
    before, after = Baseline.of(old), Baseline.of(new)
    added, readdressed = [], []
    for key, rule in after.rules.items():
        if key in before.rules:
            continue
        names = before.known_by_name(rule)
        if names:
            readdressed.append((rule, names))
        else:
            added.append(rule)
    gone = [rule for key, rule in before.rules.items() if key not in after.rules and not after.known_by_name(rule)]
    return Diff(added, gone, readdressed)


def evidence(rule: Rule) -> dict[str, object]:
    """What a destination was seen with, as plain data (names and processes are the captures' own text)."""
    hosts = sorted(rule.evidence.hosts) if rule.evidence is not None else []
    return {
        "protocol": rule.protocol.name.lower(),
        "family": rule.family.label.lower(),
        "dst": str(rule.dst),
        "dport": rule.dport,
        "hostnames": list(rule.hostnames),
        "connections": rule.connections,
        "first_seen": rule.first_seen,
        "last_seen": rule.last_seen,
        "first_seen_utc": stamp(rule.first_seen),
        "last_seen_utc": stamp(rule.last_seen),
        "processes": sorted({p.name for p in rule.processes}),
        "users": sorted({p.user or str(p.uid) for p in rule.processes if p.user or p.uid is not None}),
        "hosts": hosts,
        "runs": len(rule.evidence.runs) if rule.evidence is not None else 1,
    }


def describe(rule: Rule) -> str:
    """One line of evidence, before escaping for the terminal."""
    names = f" ({', '.join(rule.hostnames)})" if rule.hostnames else ""
    who = ", ".join(sorted({p.name for p in rule.processes})) or "unknown"
    where = ""
    if rule.evidence is not None:
        where = f"; seen on {', '.join(sorted(rule.evidence.hosts))} in {len(rule.evidence.runs)} run(s)"
    return (
        f"{rule.protocol.name} {rule.dst} port {rule.dport}{names}: {rule.connections} connection(s), "
        f"first {stamp(rule.first_seen)}, last {stamp(rule.last_seen)}; by {who}{where}"
    )
