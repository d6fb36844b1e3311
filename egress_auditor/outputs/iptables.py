"""iptables output: shell commands or iptables-restore files for the flows seen."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from egress_auditor.escape import comment_line, iptables_cgroup_path, rule_comment
from egress_auditor.model import Family, Flow, Summary
from egress_auditor.outputs import OutputBase
from egress_auditor.plugins import Option, Plugin
from egress_auditor.rules import aggregate as aggregation
from egress_auditor.rules import scope as scoping
from egress_auditor.rules.firewall import rule_comments, write_atomically
from egress_auditor.rules.policy import Policy, policy_options
from egress_auditor.rules.provenance import VERBOSE_OPTION, header_lines
from egress_auditor.rules.rule import comment_text
from egress_auditor.rules.scope import SCOPES, ScopedRule

ESTABLISHED = "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
LOOPBACK = "-o lo -j ACCEPT"
# Without neighbour discovery a DROP policy cuts IPv6 off entirely.
NDP_TYPES = ("router-solicitation", "neighbour-solicitation", "neighbour-advertisement")


def scoped_rules(flows: list[Flow], scope: str) -> list[ScopedRule]:
    """The grouping shared with the nftables output (scope.py), with cgroup paths as iptables takes them."""
    return scoping.scoped_rules(flows, scope, iptables_cgroup_path, "iptables")


def rule_spec(scoped: ScopedRule) -> str:
    """The match and target of a rule, shared by both formats."""
    rule = scoped.rule
    proto = rule.protocol.name.lower()
    comment = rule_comment(comment_text(rule))
    who = ""
    if scoped.cgroup:  # already a bare word: iptables_cgroup_path refuses anything else
        who = f"-m cgroup --path {scoped.cgroup} "
    elif scoped.uid is not None:
        who = f"-m owner --uid-owner {scoped.uid} "
    return (
        f"-d {rule.dst}/{rule.prefix_length} -p {proto} -m {proto} --dport {rule.dport} {who}"
        f'-m comment --comment "{comment}" -j ACCEPT'
    )


def scope_lines(rules: list[ScopedRule], scope: str) -> list[str]:
    if scope == "none":
        return []
    lines = [f"# scope: {scope}: each rule allows its destination only for the {scope} it was seen from"]
    if any(s.cgroup for s in rules):
        lines.append("# -m cgroup --path is looked up when a rule is loaded: each cgroup must exist then")
    return lines


def audit_target(policy: Policy) -> str:
    """What the audit rule does to a packet no allow rule took: log it to NFLOG and let it pass."""
    return f'-j NFLOG --nflog-group {policy.log_group} --nflog-prefix "{policy.log_prefix}"'


def render_commands(
    rules: list[ScopedRule], summary: Summary, verbose: int, policy: Policy, scope: str = "none"
) -> str:
    lines = ["#!/bin/sh", *("# " + comment_line(h) for h in header_lines(summary)), *scope_lines(rules, scope)]
    lines.extend(f"# {line}" for line in policy.explain())
    # Numbered inserts: above the rules the chain holds already, and in the order of this file.
    positions = {"iptables": 0, "ip6tables": 0}

    def insert(binary: str, spec: str) -> str:
        positions[binary] += 1
        return f"{binary} -I OUTPUT {positions[binary]} {spec}"

    if policy.guarded:
        lines.append("# loopback, replies and IPv6 neighbour discovery first (the policy below would stop them)")
        for binary in ("iptables", "ip6tables"):
            if policy.loopback_first:
                lines.append(insert(binary, LOOPBACK))
            lines.append(insert(binary, ESTABLISHED))
        for ndp in NDP_TYPES:
            lines.append(insert("ip6tables", f"-p ipv6-icmp -m icmp6 --icmpv6-type {ndp} -j ACCEPT"))
    if not rules:
        lines.append("# no connections seen")
    for scoped in rules:
        binary = "iptables" if scoped.rule.family is Family.IPV4 else "ip6tables"
        lines.extend(rule_comments(scoped, verbose))
        lines.append(insert(binary, rule_spec(scoped)))
    if policy.audit:
        # Appended: after the rules the chain held already, as a drop policy would act.
        lines.append(f"iptables -A OUTPUT {audit_target(policy)}")
        lines.append(f"ip6tables -A OUTPUT {audit_target(policy)}")
    if policy.drop:
        lines.append("iptables -P OUTPUT DROP")
        lines.append("ip6tables -P OUTPUT DROP")
    return "\n".join(lines) + "\n"


def render_restore(
    rules: list[ScopedRule], summary: Summary, family: Family, verbose: int, policy: Policy, scope: str = "none"
) -> str:
    lines = [
        *("# " + comment_line(h) for h in header_lines(summary)),
        *scope_lines([s for s in rules if s.rule.family is family], scope),
        *(f"# {line}" for line in policy.explain()),
        f"# {family.label} rules for {'ip6tables' if family is Family.IPV6 else 'iptables'}-restore",
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        f":OUTPUT {'DROP' if policy.drop else 'ACCEPT'} [0:0]",
    ]
    if policy.guarded and policy.loopback_first:
        lines.append(f"-A OUTPUT {LOOPBACK}")
    lines.append(f"-A OUTPUT {ESTABLISHED}")
    if family is Family.IPV6:
        lines.extend(f"-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type {ndp} -j ACCEPT" for ndp in NDP_TYPES)
    for scoped in rules:
        if scoped.rule.family is family:
            lines.extend(rule_comments(scoped, verbose))
            lines.append(f"-A OUTPUT {rule_spec(scoped)}")
    if policy.audit:
        lines.append(f"-A OUTPUT {audit_target(policy)}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class IptablesOutput(OutputBase):
    name = "iptables"

    def __init__(self, options: dict[str, Any]) -> None:
        self.format: str = options["format"]
        self.verbose: int = options["verbose"]
        self.policy = Policy.from_options(options)
        self.dir: str = options["dir"]
        self.scope: str = options["scope"]
        self.aggregate: tuple[int, int] | None = options["aggregate"]

    def _rules(self, flows: list[Flow]) -> list[ScopedRule]:
        return aggregation.aggregate(scoped_rules(flows, self.scope), self.aggregate)

    def _write_dir(self, rules: list[ScopedRule], summary: Summary) -> None:
        target = Path(self.dir)
        texts = [
            (target / filename, render_restore(rules, summary, family, self.verbose, self.policy, self.scope))
            for family, filename in ((Family.IPV4, "rules.v4"), (Family.IPV6, "rules.v6"))
        ]
        for path, text in texts:
            write_atomically(path, text)

    def snapshot(self, flows: list[Flow], summary: Summary) -> None:
        """The files a stop now would write (nothing on stdout: the rules go there once, at the end)."""
        if self.dir:
            self._write_dir(self._rules(flows), summary)

    def finish(self, flows: list[Flow], summary: Summary) -> str:
        rules = self._rules(flows)
        if self.dir:
            try:
                self._write_dir(rules, summary)
            except OSError as exc:  # a full disk: the files keep what the last snapshot wrote, stdout the rules
                print(f"egress-auditor: iptables:dir {self.dir} not written: {exc}", file=sys.stderr)
        if self.format == "restore":
            return render_restore(rules, summary, Family.IPV4, self.verbose, self.policy, self.scope)
        return render_commands(rules, summary, self.verbose, self.policy, self.scope)


PLUGIN = Plugin(
    name="iptables",
    kind="output",
    description="iptables rules allowing what was seen: shell commands, or iptables-restore files",
    factory=IptablesOutput,
    options=(
        Option(
            "format",
            "commands: iptables/ip6tables command lines; restore: an iptables-restore file of the IPv4 rules on stdout",
            "commands",
            ("commands", "restore"),
        ),
        VERBOSE_OPTION,
        *policy_options("a default DROP policy on OUTPUT", "-o lo"),
        Option(
            "dir",
            "also write DIR/rules.v4 and DIR/rules.v6 in restore format (the layout iptables-persistent loads)",
            "",
            valid="a directory",
        ),
        Option(
            "scope",
            "user: allow each destination only for the uid seen (-m owner --uid-owner); "
            "cgroup: only for the cgroup v2 seen (-m cgroup --path), else its uid",
            "none",
            SCOPES,
        ),
        aggregation.OPTION,
    ),
    example="-o iptables -O iptables:verbose:2 -O iptables:scope:cgroup",
)
