"""Review of saved captures before they become a policy: keep the rules that
enough hosts saw, and list the others with their evidence instead of
dropping them silently."""

from __future__ import annotations

from egress_auditor.model import Flow
from egress_auditor.rules.provenance import rule_lines
from egress_auditor.rules.rule import Rule, rules_from_flows


def hosts_seen(rule: Rule) -> int:
    # A single run carries no evidence: its one host saw everything in it.
    return len(rule.evidence.hosts) if rule.evidence is not None else 1


def keep_seen_on(flows: list[Flow], min_hosts: int) -> tuple[list[Flow], list[str]]:
    """The flows of rules seen on at least min_hosts hosts, and `#`-ready lines listing the rest."""
    left_out = {(r.protocol, r.family, r.dst, r.dport): r for r in rules_from_flows(flows) if hosts_seen(r) < min_hosts}
    if not left_out:
        return flows, []
    kept = [f for f in flows if (f.key.protocol, f.key.family, f.key.dst, f.key.dport) not in left_out]
    lines = [f"left out: {len(left_out)} rule(s) seen on fewer than {min_hosts} host(s) (--min-hosts {min_hosts}):"]
    for rule in left_out.values():
        lines.extend(f"  {line}" for line in rule_lines(rule, 0))
    return kept, lines
