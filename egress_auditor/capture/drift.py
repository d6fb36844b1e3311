"""Drift: connections that a baseline of earlier captures does not cover.

A flow is covered when the baseline reached the same protocol, destination
and port (or the same DNS name on that protocol and port: CDNs rotate
addresses), by the same uid or cgroup where the rules are scoped that way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from egress_auditor.capture.baseline import Baseline
from egress_auditor.model import Flow

EXIT_DRIFT = 3  # `trace --baseline` found connections the baseline does not cover
SCOPES = ("none", "user", "cgroup")


def strictest(scopes: Iterable[str]) -> str:
    """The scope to match on when outputs differ: the one that tells most apart."""
    return max(scopes, key=SCOPES.index, default="none")


@dataclass
class DriftWatch:
    baseline: Baseline
    scope: str = "none"
    source: str = ""  # the baseline files, for the rules' header

    def covers(self, flow: Flow) -> bool:
        key = flow.key
        found = self.baseline.destinations_of(key.protocol, key.family, key.dst, key.dport, flow.hostnames)
        if not found or self.scope == "none":
            return bool(found)
        if self.scope == "cgroup":
            cgroups = {p.cgroup for p in flow.processes.values() if p.cgroup}
            if cgroups:  # a flow whose cgroup is unknown is matched on its uid, as the rules scope it
                return any(cgroups & self.baseline.cgroups.get(d, set()) for d in found)
        return any(key.uid in self.baseline.uids.get(d, set()) for d in found)

    def drifted(self, flows: Iterable[Flow]) -> list[Flow]:
        return [f for f in flows if not self.covers(f)]
