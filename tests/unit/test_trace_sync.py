"""When a trace run folds kernel counts: rarely when it costs, never over
SYNC_MAX_S apart, and soon after lost events (their flows are only in the
kernel map until a sync). A scripted input stands in for the kernel here; the
eBPF input's own sync is tested against the kernel in tests/kernel."""

from __future__ import annotations

import io
import itertools
import time
from typing import Any

import pytest

from egress_auditor import trace
from egress_auditor.display.live import PlainLog
from egress_auditor.inputs import InputBase, InputStats
from egress_auditor.trace import TraceRun


class ScriptedInput(InputBase):
    """A sync that takes `cost` seconds; events lost from `lose_at` seconds after open()."""

    name = "scripted"

    def __init__(self, cost: float, lose_at: float | None = None) -> None:
        self.cost = cost
        self.lose_at = lose_at
        self.opened = 0.0
        self.syncs: list[float] = []  # seconds after open()

    def open(self) -> str:
        self.opened = time.monotonic()
        return "scripted"

    def poll(self, timeout_s: float, _emit: Any) -> None:
        time.sleep(timeout_s)

    def sync(self, _emit: Any, _on_count: Any) -> None:
        self.syncs.append(time.monotonic() - self.opened)
        time.sleep(self.cost)

    def stats(self) -> InputStats:
        elapsed = time.monotonic() - self.opened
        lost = 1 if self.lose_at is not None and elapsed >= self.lose_at else 0
        return InputStats(events_lost=lost)

    def close(self) -> None:
        pass


def run_for(source: ScriptedInput, seconds: float) -> list[float]:
    """Syncs made while the run was going (the one at the end left out)."""
    run = TraceRun(
        inputs=[source],
        outputs=[],
        display=PlainLog(io.StringIO()),
        duration=seconds,
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    assert run.run() == 0
    return source.syncs[:-1]


def test_a_costly_sync_is_spaced_out() -> None:
    # 50 ms per sync at 0.5% of the time: the next one 10 s later, past this run.
    syncs = run_for(ScriptedInput(cost=0.05), 3.0)
    assert len(syncs) == 1 and syncs[0] == pytest.approx(trace.SYNC_S, abs=0.3)


def test_syncs_are_never_further_apart_than_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "SYNC_MAX_S", 1.0)
    syncs = run_for(ScriptedInput(cost=0.05), 3.6)
    assert len(syncs) >= 3, syncs
    assert max(b - a for a, b in itertools.pairwise(syncs)) < 1.0 + 0.05 + 0.5


def test_lost_events_bring_the_next_sync_forward() -> None:
    # The same costly sync, but events are lost after the first: the next comes about a second later.
    syncs = run_for(ScriptedInput(cost=0.05, lose_at=1.3), 3.0)
    assert len(syncs) >= 2, syncs
    assert syncs[1] - syncs[0] < trace.SYNC_S + 0.05 + 0.6
