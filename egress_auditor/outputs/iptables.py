"""iptables output: shell commands or iptables-restore files for the flows seen."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from egress_auditor import scope as scoping
from egress_auditor.escape import comment_line, iptables_cgroup_path, rule_comment
from egress_auditor.model import Connection, Family, Flow, Summary
from egress_auditor.plugins import Option, Plugin
from egress_auditor.provenance import VERBOSE_OPTION, header_lines, rule_lines
from egress_auditor.rules import comment_text
from egress_auditor.scope import SCOPES, ScopedRule

ESTABLISHED = "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
# Without neighbour discovery a DROP policy cuts IPv6 off entirely.
NDP_TYPES = ("router-solicitation", "neighbour-solicitation", "neighbour-advertisement")


def describe_rule(scoped: ScopedRule, verbose: int) -> list[str]:
    """The `#` lines above a rule (provenance.rule_lines), escaped for a comment line."""
    lines = rule_lines(scoped.rule, verbose)
    if scoped.note:
        lines.append(f"  {scoped.note}")
    return ["# " + comment_line(line) for line in lines]


def scoped_rules(flows: list[Flow], scope: str) -> list[ScopedRule]:
    """The grouping shared with the nftables output (scope.py), with cgroup paths as iptables takes them."""
    return scoping.scoped_rules(flows, scope, iptables_cgroup_path, "iptables")


def rule_spec(scoped: ScopedRule) -> str:
    """The match and target of a rule, shared by both formats."""
    rule = scoped.rule
    proto = rule.protocol.name.lower()
    prefix = 32 if rule.family is Family.IPV4 else 128
    comment = rule_comment(comment_text(rule))
    who = ""
    if scoped.cgroup:  # already a bare word: iptables_cgroup_path refuses anything else
        who = f"-m cgroup --path {scoped.cgroup} "
    elif scoped.uid is not None:
        who = f"-m owner --uid-owner {scoped.uid} "
    return (
        f"-d {rule.dst}/{prefix} -p {proto} -m {proto} --dport {rule.dport} {who}"
        f'-m comment --comment "{comment}" -j ACCEPT'
    )


def scope_lines(rules: list[ScopedRule], scope: str) -> list[str]:
    if scope == "none":
        return []
    lines = [f"# scope: {scope}: each rule allows its destination only for the {scope} it was seen from"]
    if any(s.cgroup for s in rules):
        lines.append("# -m cgroup --path is looked up when a rule is loaded: each cgroup must exist then")
    return lines


def render_commands(rules: list[ScopedRule], summary: Summary, verbose: int, drop: bool, scope: str = "none") -> str:
    lines = ["#!/bin/sh", *("# " + comment_line(h) for h in header_lines(summary)), *scope_lines(rules, scope)]
    # Numbered inserts: above the rules the chain holds already, and in the order of this file.
    positions = {"iptables": 0, "ip6tables": 0}

    def insert(binary: str, spec: str) -> str:
        positions[binary] += 1
        return f"{binary} -I OUTPUT {positions[binary]} {spec}"

    if drop:
        lines.append("# replies first, and IPv6 neighbour discovery (the DROP policy below would cut it off)")
        lines.append(insert("iptables", ESTABLISHED))
        lines.append(insert("ip6tables", ESTABLISHED))
        for ndp in NDP_TYPES:
            lines.append(insert("ip6tables", f"-p ipv6-icmp -m icmp6 --icmpv6-type {ndp} -j ACCEPT"))
    if not rules:
        lines.append("# no connections seen")
    for scoped in rules:
        binary = "iptables" if scoped.rule.family is Family.IPV4 else "ip6tables"
        lines.extend(describe_rule(scoped, verbose))
        lines.append(insert(binary, rule_spec(scoped)))
    if drop:
        lines.append("# default deny: only the connections above (and replies) are allowed")
        lines.append("iptables -P OUTPUT DROP")
        lines.append("ip6tables -P OUTPUT DROP")
    return "\n".join(lines) + "\n"


def render_restore(
    rules: list[ScopedRule], summary: Summary, family: Family, verbose: int, drop: bool, scope: str = "none"
) -> str:
    policy = "DROP" if drop else "ACCEPT"
    lines = [
        *("# " + comment_line(h) for h in header_lines(summary)),
        *scope_lines([s for s in rules if s.rule.family is family], scope),
        f"# {family.label} rules for {'ip6tables' if family is Family.IPV6 else 'iptables'}-restore",
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        f":OUTPUT {policy} [0:0]",
        f"-A OUTPUT {ESTABLISHED}",
    ]
    if family is Family.IPV6:
        lines.extend(f"-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type {ndp} -j ACCEPT" for ndp in NDP_TYPES)
    for scoped in rules:
        if scoped.rule.family is family:
            lines.extend(describe_rule(scoped, verbose))
            lines.append(f"-A OUTPUT {rule_spec(scoped)}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Readers (iptables-persistent at boot) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class IptablesOutput:
    name = "iptables"

    def __init__(self, options: dict[str, Any]) -> None:
        self.format: str = options["format"]
        self.verbose: int = options["verbose"]
        self.drop: bool = options["policy"] == "drop"
        self.dir: str = options["dir"]
        self.scope: str = options["scope"]

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None:
        """Rules are rendered from the final flows; nothing to do per event."""

    def finish(self, flows: list[Flow], summary: Summary) -> str:
        rules = scoped_rules(flows, self.scope)
        if self.dir:
            target = Path(self.dir)
            for family, filename in ((Family.IPV4, "rules.v4"), (Family.IPV6, "rules.v6")):
                text = render_restore(rules, summary, family, self.verbose, self.drop, self.scope)
                write_atomically(target / filename, text)
        if self.format == "restore":
            return render_restore(rules, summary, Family.IPV4, self.verbose, self.drop, self.scope)
        return render_commands(rules, summary, self.verbose, self.drop, self.scope)


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
        Option(
            "policy",
            "drop: also set a default DROP policy on OUTPUT (after allowing replies)",
            "accept",
            ("accept", "drop"),
        ),
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
    ),
    example="-o iptables -O iptables:verbose:2 -O iptables:scope:cgroup",
)
