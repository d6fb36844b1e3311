"""nftables output: one `nft -f` file that replaces a table of its own.

The file adds `table inet egress_auditor`, deletes it and defines it again,
all in the one transaction `nft -f` makes, so loading it twice gives the same
ruleset and never touches any other table.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from egress_auditor.escape import comment_line, nft_cgroup_path, nft_comment
from egress_auditor.model import Family, Flow, Summary
from egress_auditor.outputs import OutputBase
from egress_auditor.plugins import Option, Plugin
from egress_auditor.rules import aggregate as aggregation
from egress_auditor.rules import scope as scoping
from egress_auditor.rules.firewall import rule_comments, write_atomically
from egress_auditor.rules.policy import Policy, policy_options
from egress_auditor.rules.provenance import VERBOSE_OPTION, header_lines
from egress_auditor.rules.rule import comment_text
from egress_auditor.rules.scope import ScopedRule

TABLE = "egress_auditor"
SET_MIN = 2  # a set is one rule however many destinations: worth it from two on
NDP = "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept"
_ADDRESS = {Family.IPV4: ("ip", "ipv4_addr"), Family.IPV6: ("ip6", "ipv6_addr")}


def scoped_rules(flows: Iterable[Flow], scope: str) -> list[ScopedRule]:
    """The grouping shared with the iptables output (scope.py), with cgroup paths as nft writes them."""
    return scoping.scoped_rules(flows, scope, nft_cgroup_path, "nft")


def _match(scoped: ScopedRule) -> str:
    rule = scoped.rule
    address, _ = _ADDRESS[rule.family]
    scope = ""
    if scoped.cgroup:
        scope = f'socket cgroupv2 level {scoped.cgroup_level} "{scoped.cgroup}" '
    elif scoped.uid is not None:
        scope = f"meta skuid {scoped.uid} "
    return f"{scope}{address} daddr {rule.destination} {rule.protocol.name.lower()} dport {rule.dport}"


def _set_name(family: Family) -> str:
    return f"allow_{family.label.lower()}"


def render(
    flows: list[Flow], summary: Summary, verbose: int, policy: Policy, scope: str,
    prefixes: tuple[int, int] | None = None,
) -> str:  # fmt: skip
    scoped = aggregation.aggregate(scoped_rules(flows, scope), prefixes)
    by_uid = scope != "none"
    sets: dict[Family, list[ScopedRule]] = {}
    for family in (Family.IPV4, Family.IPV6):
        settable = [s for s in scoped if s.rule.family is family and s.cgroup is None]
        if len(settable) >= SET_MIN:
            sets[family] = settable
    singles = [s for s in scoped if s.rule.family not in sets or s.cgroup is not None]

    lines = ["#!/usr/sbin/nft -f", *(f"# {comment_line(h)}" for h in header_lines(summary))]
    lines.append(f"# scope: {scope}; loads in one transaction and replaces only table inet {TABLE}")
    lines.extend(f"# {line}" for line in policy.explain())
    if any(s.cgroup for s in scoped):
        lines.append("# socket cgroupv2 paths are looked up when the file is loaded: each cgroup must exist then")
    lines += [f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    for family, members in sets.items():
        _, type_ = _ADDRESS[family]
        key = f"{type_} . inet_proto . inet_service" + (" . uid" if by_uid else "")
        lines += [f"\tset {_set_name(family)} {{", f"\t\ttype {key}"]
        if any(s.rule.prefix is not None for s in members):
            lines.append("\t\tflags interval")  # an aggregated element is a prefix
        lines.append("\t\telements = {")
        for s in members:
            element = f"{s.rule.destination} . {s.rule.protocol.name.lower()} . {s.rule.dport}"
            element += f" . {s.uid}" if by_uid else ""
            lines += rule_comments(s, verbose, "\t\t\t")
            lines.append(f'\t\t\t{element} comment "{nft_comment(comment_text(s.rule))}",')
        lines += ["\t\t}", "\t}", ""]
    lines += [
        "\tchain output {",
        f"\t\ttype filter hook output priority filter; policy {'drop' if policy.drop else 'accept'};",
    ]
    if policy.guarded and policy.loopback_first:
        lines.append('\t\toif "lo" accept')  # comments in this chain name destinations seen
    lines += [
        "\t\tct state established,related accept",
        "\t\t# without neighbour discovery a drop policy cuts IPv6 off entirely",
        f"\t\t{NDP}",
    ]
    if not scoped:
        lines.append("\t\t# no connections seen")
    for family in sets:
        address, _ = _ADDRESS[family]
        key = f"{address} daddr . meta l4proto . th dport" + (" . meta skuid" if by_uid else "")
        lines.append(f'\t\t{key} @{_set_name(family)} accept comment "destinations seen, one element each"')
    for s in singles:
        lines += rule_comments(s, verbose, "\t\t")
        lines.append(f'\t\t{_match(s)} accept comment "{nft_comment(comment_text(s.rule))}"')
    if policy.audit:
        lines.append(
            f'\t\tcounter log prefix "{policy.log_prefix}" group {policy.log_group} '
            'comment "audit: what a drop policy would drop, logged and let through"'
        )
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


class NftablesOutput(OutputBase):
    name = "nftables"

    def __init__(self, options: dict[str, Any]) -> None:
        self.verbose: int = options["verbose"]
        self.policy = Policy.from_options(options)
        self.scope: str = options["scope"]
        self.file: str = options["file"]
        self.aggregate: tuple[int, int] | None = options["aggregate"]

    def _render(self, flows: list[Flow], summary: Summary) -> str:
        return render(flows, summary, self.verbose, self.policy, self.scope, self.aggregate)

    def snapshot(self, flows: list[Flow], summary: Summary) -> None:
        """The file a stop now would write (nothing on stdout: the rules go there once, at the end)."""
        if self.file:
            write_atomically(Path(self.file), self._render(flows, summary))

    def finish(self, flows: list[Flow], summary: Summary) -> str:
        text = self._render(flows, summary)
        if self.file:
            try:
                write_atomically(Path(self.file), text)
            except OSError as exc:  # a full disk: the file keeps what the last snapshot wrote, stdout the rules
                print(f"egress-auditor: nftables:file {self.file} not written: {exc}", file=sys.stderr)
        return text


PLUGIN = Plugin(
    name="nftables",
    kind="output",
    description="an nft -f file that replaces table inet egress_auditor with rules allowing what was seen",
    factory=NftablesOutput,
    options=(
        VERBOSE_OPTION,
        *policy_options("the output chain drops what was not seen (IPv6 neighbour discovery stays allowed)", "oif lo"),
        Option(
            "scope",
            "user: allow each destination only for the uid seen (meta skuid); "
            "cgroup: only for the cgroup seen (socket cgroupv2), else its uid",
            "none",
            ("none", "user", "cgroup"),
        ),
        Option(
            "file",
            "also write the ruleset to FILE, atomically (e.g. /etc/nftables.d/egress.nft)",
            "",
            valid="a path",
        ),
        aggregation.OPTION,
    ),
    example="-o nftables -O nftables:policy:drop -O nftables:scope:user",
)
