"""Inputs: what the kernel reports, as connection events.

In: the kernel's events (eBPF: ebpf/) or packets netfilter copies (nflog, nfqueue: netfilter/). Out:
`Connection` events, translated only; DNS answers feed the run's names.

`Input` is what a trace run asks of an input; `InputBase` gives the optional methods their defaults, so a
plugin writes only what it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from egress_auditor.model import Connection, FlowKey

if TYPE_CHECKING:
    from egress_auditor.attribution.names import DnsNames

Emit = Callable[[Connection], None]
OnCount = Callable[[FlowKey, int, float], None]  # (flow, connections added since the last report, last seen)


@dataclass
class InputStats:
    connections: int = 0  # connections counted apart from the flows handed over, repeats included (netfilter)
    events_lost: int = 0  # events the kernel could not deliver
    map_full: int = 0  # connections that found the flow map full (sent one by one)


class Input(Protocol):
    name: str  # the plugin's name, as in -i NAME

    def open(self) -> str:
        """Attach to the kernel; returns what was attached, for the start-up line."""
        ...

    def poll(self, timeout_s: float, emit: Emit) -> None:
        """Hand each new connection to `emit`, waiting at most `timeout_s` for one."""
        ...

    def sync(self, emit: Emit, on_count: OnCount) -> None:
        """Report connections counted in the kernel since the last sync (`on_count`) and flows whose
        event was lost (`emit`)."""
        ...

    def stats(self) -> InputStats: ...

    def close(self) -> None:
        """Detach; called once, whether or not open() succeeded."""
        ...

    def restrict_to_cgroup(self, cgroup_id: int, depth: int) -> None:
        """Before open(): keep only connections from this cgroup and below (trace -- CMD)."""
        ...

    def learn_names(self, names: DnsNames) -> None:
        """Before open(): the run's DNS name cache, for an input that reads DNS answers to feed.
        Inputs never name connections themselves: the run does (enrich.py)."""
        ...


class InputBase:
    """Defaults for an input's optional methods."""

    name = ""

    def sync(self, emit: Emit, on_count: OnCount) -> None:
        """Nothing to fold: every connection arrives as its own event."""

    def restrict_to_cgroup(self, cgroup_id: int, depth: int) -> None:
        """No filter in the kernel: the run drops connections from outside the command's cgroup itself."""

    def learn_names(self, names: DnsNames) -> None:
        """No DNS answers read here."""
