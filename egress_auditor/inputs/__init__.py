"""Inputs turn what the kernel reports into Connection values.

An input provides: open() -> str (what it attached, for the start-up line),
poll(timeout_s, emit), sync(emit, on_count), stats() -> InputStats, close().
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol as Interface

from egress_auditor.model import Connection, FlowKey

Emit = Callable[[Connection], None]
OnCount = Callable[[FlowKey, int, float], None]


@dataclass
class InputStats:
    connects: int = 0  # connects counted apart from the flows handed over, repeats included (netfilter)
    events_lost: int = 0  # events the kernel could not deliver
    map_full: int = 0  # connects that found the flow map full (sent one by one)


class Input(Interface):
    name: str

    def open(self) -> str: ...

    def poll(self, timeout_s: float, emit: Emit) -> None: ...

    def sync(self, emit: Emit, on_count: OnCount) -> None: ...

    def stats(self) -> InputStats: ...

    def close(self) -> None: ...
