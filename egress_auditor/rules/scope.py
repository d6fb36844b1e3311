"""Scoped rules, shared by the firewall outputs: each destination allowed for
everyone (scope none), only for the uid that used it (user), or only for the
cgroup it came from (cgroup), so a rule learned for one service does not open
the door for every process on the host.

Where the cgroup cannot be used (unknown, not writable in the target's
syntax, or the transient cgroup of `trace -- CMD`, gone once the command
ends), the rule falls back to the uid, which is still narrower than no scope,
and says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from egress_auditor.attribution.cgroups import AUDIT_CGROUP_PREFIX
from egress_auditor.model import Flow
from egress_auditor.rules.rule import Rule, rules_from_flows

SCOPES = ("none", "user", "cgroup")


@dataclass(frozen=True)
class ScopedRule:
    """A rule and who it is allowed for: everyone, one uid, or one cgroup."""

    rule: Rule
    uid: int | None = None
    cgroup: str | None = None  # as the output's path function wrote it
    note: str = ""  # why the scope asked for could not be used

    @property
    def cgroup_level(self) -> int:
        return len(self.cgroup.strip("/").split("/")) if self.cgroup else 0


def _with_processes(flow: Flow, wanted: Iterable[tuple[int, float | None]]) -> Flow:
    keep = set(wanted)
    return dataclasses.replace(flow, processes={k: p for k, p in flow.processes.items() if k in keep})


def _unusable(path: str | None, written: str | None, target: str) -> str | None:
    """Why a process's cgroup cannot scope a rule, or None when it can."""
    if not path:
        return "cgroup unknown"
    if path.strip("/").startswith(AUDIT_CGROUP_PREFIX):
        return f"cgroup {path} is the audited command's, removed when it ends"
    if written is None:
        return f"cgroup {path} cannot be written for {target}"
    return None


def scoped_rules(
    flows: Iterable[Flow], scope: str, cgroup_path: Callable[[str], str | None], target: str
) -> list[ScopedRule]:
    """Rules per destination (none), per destination and uid (user), or per
    destination and cgroup (cgroup; uid where the cgroup cannot be used).
    `cgroup_path` writes a cgroup path for the target, or None if it cannot."""
    flows = list(flows)
    if scope == "none":
        return [ScopedRule(r) for r in rules_from_flows(flows)]
    groups: dict[tuple[int | None, str | None], list[Flow]] = {}
    notes: dict[tuple[int | None, str | None], set[str]] = {}
    for flow in flows:
        if scope == "user":
            groups.setdefault((flow.key.uid, None), []).append(flow)
            continue
        by_cgroup: dict[str | None, list[tuple[int, float | None]]] = {}
        for key, process in flow.processes.items():
            written = cgroup_path(process.cgroup) if process.cgroup else None
            why = _unusable(process.cgroup, written, target)
            by_cgroup.setdefault(None if why else written, []).append(key)
            if why:
                notes.setdefault((flow.key.uid, None), set()).add(f"{why}: scoped by uid")
        for path, keys in by_cgroup.items():
            group = (None, path) if path else (flow.key.uid, None)
            groups.setdefault(group, []).append(_with_processes(flow, keys))
    scoped = [
        ScopedRule(rule, uid, cgroup, "; ".join(sorted(notes.get((uid, cgroup), ()))))
        for (uid, cgroup), members in groups.items()
        for rule in rules_from_flows(members)
    ]
    return sorted(
        scoped,
        key=lambda s: (s.rule.family, s.rule.dst, s.rule.protocol, s.rule.dport, s.uid or -1, s.cgroup or "", s.note),
    )
