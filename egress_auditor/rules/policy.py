"""What a firewall output does with a connection no rule allows: accept it,
drop it, or (audit) log it to an NFLOG group and let it pass, so an operator
can see what enforcement would break before enforcing.

Shared by the iptables and nftables outputs; each writes the same policy in
its own syntax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from egress_auditor.plugins import Option

POLICIES = ("accept", "drop", "audit")
LOOPBACK = ("accept", "rules")
# The nflog input's default group, so `-i nflog` reads an audit policy's log as it is.
AUDIT_GROUP = "100"
AUDIT_PREFIX = "egress-auditor audit: "
# iptables' --nflog-prefix holds at most 64 bytes.
PREFIX_MAX = 63


def _group(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("a group number from 0 to 65535")
    return number


def _prefix(value: str) -> str:
    if not value or len(value.encode()) > PREFIX_MAX or not value.isprintable() or '"' in value or "\\" in value:
        raise ValueError(f"printable text of 1 to {PREFIX_MAX} bytes without quotes or backslashes")
    return value


@dataclass(frozen=True)
class Policy:
    name: str = "accept"
    loopback: str = "accept"
    log_group: int = int(AUDIT_GROUP)
    log_prefix: str = AUDIT_PREFIX

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Policy:
        return cls(options["policy"], options["loopback"], int(options["log_group"]), options["log_prefix"])

    @property
    def drop(self) -> bool:
        return self.name == "drop"

    @property
    def audit(self) -> bool:
        return self.name == "audit"

    @property
    def guarded(self) -> bool:
        """A policy that acts on what was not seen: it needs replies, neighbour discovery and loopback let through."""
        return self.name != "accept"

    @property
    def loopback_first(self) -> bool:
        # A service that was quiet during the capture must not be cut off from its local peers.
        return self.loopback == "accept"

    def explain(self) -> list[str]:
        """The `#` lines that say what the file does with what no rule allows."""
        lines = []
        if self.drop:
            lines.append("policy: drop: only the connections below (and replies) are allowed")
        elif self.audit:
            lines.append(
                f"policy: audit: what no rule below allows is logged to NFLOG group {self.log_group} "
                "and counted, then let through; nothing is dropped"
            )
            lines.append(f"read it with: egress-auditor trace -i nflog -I nflog:group:{self.log_group}")
        if self.guarded:
            lines.append(
                "loopback (lo) is accepted before any rule"
                if self.loopback_first
                else "loopback (lo) is under the rules like any other interface: local services need a rule"
            )
        return lines


def policy_options(drop_means: str, loopback_match: str) -> tuple[Option, ...]:
    """The options of a firewall output that choose its policy, worded for that output."""
    return (
        Option(
            "policy",
            f"drop: {drop_means} (after allowing replies and loopback); audit: the same rules, then log "
            "(NFLOG) and count what drop would have dropped, and let it pass",
            "accept",
            POLICIES,
        ),
        Option(
            "loopback",
            f"with policy drop or audit: accept: allow loopback ({loopback_match}) before any rule; "
            "rules: loopback needs a rule like any other destination",
            "accept",
            LOOPBACK,
        ),
        Option("log_group", "with policy audit: the NFLOG group to log to", AUDIT_GROUP, convert=_group,
               valid="a group number from 0 to 65535"),
        Option("log_prefix", "with policy audit: the log prefix", AUDIT_PREFIX, convert=_prefix,
               valid=f"printable text of 1 to {PREFIX_MAX} bytes without quotes or backslashes"),
    )  # fmt: skip
