"""Aggregation, on request: destinations with the same protocol, port and
scope that fall in one prefix (a /24, say) become one rule for the smallest
prefix that holds them all, once at least THRESHOLD of them were seen.

The rule never covers more than its members need: three addresses seen in
a /24 that all lie in a /28 give a /28. Fewer than THRESHOLD addresses stay
separate rules: two addresses are as likely two services as one pool.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

from egress_auditor.model import Family, IPAddress
from egress_auditor.plugins import Option
from egress_auditor.rules.scope import ScopedRule

THRESHOLD = 3
DEFAULT_V6 = 64


def parse(text: str) -> tuple[int, int] | None:
    """`off`, `24` (IPv6: /64) or `24,56`: the widest prefix to aggregate into, per family."""
    if text == "off":
        return None
    parts = text.split(",")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise ValueError("off, an IPv4 prefix length (24), or IPv4,IPv6 (24,64)")
    v4, v6 = int(parts[0]), int(parts[1]) if len(parts) == 2 else DEFAULT_V6
    if not (8 <= v4 <= 31 and 16 <= v6 <= 127):
        raise ValueError("prefix lengths from 8 to 31 (IPv4) and 16 to 127 (IPv6)")
    return v4, v6


OPTION = Option(
    "aggregate",
    f"24 (IPv6 /{DEFAULT_V6}) or 24,56: merge {THRESHOLD} or more destinations with the same protocol, port "
    "and scope in one such prefix into one rule for the smallest prefix holding them; off: one rule per address",
    "off",
    convert=parse,
    valid="off, an IPv4 prefix length (24), or IPv4,IPv6 (24,64)",
)


def smallest_prefix(addresses: Iterable[IPAddress]) -> tuple[IPAddress, int]:
    """The network address and length of the smallest prefix holding every address."""
    members = sorted(addresses)
    first, last = int(members[0]), int(members[-1])
    bits = members[0].max_prefixlen
    length = bits - (first ^ last).bit_length()
    network = ipaddress.ip_network((members[0], length), strict=False)
    return network.network_address, length


def _merge(group: list[ScopedRule], widest: int) -> ScopedRule:
    rules = [s.rule for s in group]
    network, length = smallest_prefix(r.dst for r in rules)
    evidence = None
    for rule in rules:
        if rule.evidence is not None:
            evidence = rule.evidence if evidence is None else evidence | rule.evidence
    merged = dataclasses.replace(
        rules[0],
        dst=network,
        prefix=length,
        members=tuple(sorted(r.dst for r in rules)),
        processes=tuple(dict.fromkeys(p for r in rules for p in r.processes)),
        first_seen=min(r.first_seen for r in rules),
        last_seen=max(r.last_seen for r in rules),
        connections=sum(r.connections for r in rules),
        hostnames=tuple(sorted({h for r in rules for h in r.hostnames})),
        evidence=evidence,
    )
    reason = (
        f"aggregated: {len(rules)} addresses seen in one /{widest} (threshold {THRESHOLD}); "
        f"/{length} is the smallest prefix holding them: {', '.join(map(str, merged.members))}"
    )
    note = "; ".join(n for n in (group[0].note, reason) if n)
    return dataclasses.replace(group[0], rule=merged, note=note)


def aggregate(scoped: list[ScopedRule], prefixes: tuple[int, int] | None) -> list[ScopedRule]:
    """Scoped rules with each group of THRESHOLD or more in one prefix merged into one rule."""
    if prefixes is None:
        return scoped
    groups: dict[tuple, list[ScopedRule]] = {}
    out = []
    for s in scoped:
        r = s.rule
        if r.prefix is not None:  # a network already (past the flow cap)
            out.append(s)
            continue
        widest = prefixes[0] if r.family is Family.IPV4 else prefixes[1]
        block = ipaddress.ip_network((r.dst, widest), strict=False)
        groups.setdefault((r.protocol, r.family, r.dport, s.uid, s.cgroup, block), []).append(s)
    for (_, family, *_rest), members in groups.items():
        widest = prefixes[0] if family is Family.IPV4 else prefixes[1]
        out.extend([_merge(members, widest)] if len(members) >= THRESHOLD else members)
    return sorted(
        out,
        key=lambda s: (s.rule.family, s.rule.dst, s.rule.protocol, s.rule.dport, s.uid or -1, s.cgroup or "", s.note),
    )
