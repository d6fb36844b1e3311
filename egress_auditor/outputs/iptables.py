"""iptables output: shell commands or iptables-restore files for the flows seen."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from egress_auditor.escape import comment_line, rule_comment
from egress_auditor.model import Connection, Family, Flow, Summary
from egress_auditor.plugins import Option, Plugin
from egress_auditor.provenance import header_lines, rule_lines
from egress_auditor.rules import Rule, comment_text, rules_from_flows

ESTABLISHED = "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
# Without neighbour discovery a DROP policy cuts IPv6 off entirely.
NDP_TYPES = ("router-solicitation", "neighbour-solicitation", "neighbour-advertisement")


def describe_rule(rule: Rule, verbose: int) -> list[str]:
    """The `#` lines above a rule (provenance.rule_lines), escaped for a comment line."""
    return ["# " + comment_line(line) for line in rule_lines(rule, verbose)]


def rule_spec(rule: Rule) -> str:
    """The match and target of a rule, shared by both formats."""
    proto = rule.protocol.name.lower()
    prefix = 32 if rule.family is Family.IPV4 else 128
    comment = rule_comment(comment_text(rule))
    return (
        f'-d {rule.dst}/{prefix} -p {proto} -m {proto} --dport {rule.dport} -m comment --comment "{comment}" -j ACCEPT'
    )


def render_commands(rules: list[Rule], summary: Summary, verbose: int, drop: bool) -> str:
    lines = ["#!/bin/sh", *("# " + comment_line(h) for h in header_lines(summary))]
    if not rules:
        lines.append("# no connections seen")
    for rule in rules:
        binary = "iptables" if rule.family is Family.IPV4 else "ip6tables"
        lines.extend(describe_rule(rule, verbose))
        lines.append(f"{binary} -I OUTPUT {rule_spec(rule)}")
    if drop:
        # -I puts each rule first: these go last so they end up on top.
        lines.append("# default deny: only the connections above (and replies) are allowed")
        for ndp in NDP_TYPES:
            lines.append(f"ip6tables -I OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type {ndp} -j ACCEPT")
        lines.append(f"iptables -I OUTPUT {ESTABLISHED}")
        lines.append(f"ip6tables -I OUTPUT {ESTABLISHED}")
        lines.append("iptables -P OUTPUT DROP")
        lines.append("ip6tables -P OUTPUT DROP")
    return "\n".join(lines) + "\n"


def render_restore(rules: list[Rule], summary: Summary, family: Family, verbose: int, drop: bool) -> str:
    policy = "DROP" if drop else "ACCEPT"
    lines = [
        *("# " + comment_line(h) for h in header_lines(summary)),
        f"# {family.label} rules for {'ip6tables' if family is Family.IPV6 else 'iptables'}-restore",
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        f":OUTPUT {policy} [0:0]",
        f"-A OUTPUT {ESTABLISHED}",
    ]
    if family is Family.IPV6:
        lines.extend(f"-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type {ndp} -j ACCEPT" for ndp in NDP_TYPES)
    for rule in rules:
        if rule.family is family:
            lines.extend(describe_rule(rule, verbose))
            lines.append(f"-A OUTPUT {rule_spec(rule)}")
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

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None:
        """Rules are rendered from the final flows; nothing to do per event."""

    def finish(self, flows: list[Flow], summary: Summary) -> str:
        rules = rules_from_flows(flows)
        if self.dir:
            target = Path(self.dir)
            for family, filename in ((Family.IPV4, "rules.v4"), (Family.IPV6, "rules.v6")):
                write_atomically(target / filename, render_restore(rules, summary, family, self.verbose, self.drop))
        if self.format == "restore":
            return render_restore(rules, summary, Family.IPV4, self.verbose, self.drop)
        return render_commands(rules, summary, self.verbose, self.drop)


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
        Option(
            "verbose",
            "0: count, times, processes per rule in # lines; 1: a # line per process; 2: also command lines, parents",
            "0",
            ("0", "1", "2"),
            convert=int,
        ),
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
    ),
    example="-o iptables -O iptables:verbose:2",
)
