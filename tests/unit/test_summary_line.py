"""The periodic summary line of a long run without the live table (a
service's journal): flows, connections, events lost, resident memory and time
up, every --summary-every. A scripted input stands in for the kernel; the
memory figure is this very process's, as read by the kernel."""

from __future__ import annotations

import io
import re
import time
from typing import Any

import psutil
import pytest
from flowdata import START, conn, proc

from egress_auditor.display.live import LiveTable, PlainLog
from egress_auditor.inputs import InputBase, InputStats
from egress_auditor.trace import TraceRun, time_span

LINE = re.compile(
    r"egress-auditor: summary: (\d+) flows, (\d+) connections, (\d+) events lost, (\d+) MB resident, up (\d+:\d\d:\d\d)"
)


class ScriptedInput(InputBase):
    """Three connects of two flows at the first poll; the kernel counted five, and lost two events."""

    name = "scripted"

    def __init__(self) -> None:
        self.sent = False

    def open(self) -> str:
        return "scripted"

    def poll(self, timeout_s: float, emit: Any) -> None:
        if not self.sent:
            self.sent = True
            curl = proc(4242, "curl", 0, "root")
            for port in (443, 443, 80):
                emit(conn(curl, "192.0.2.1", port, START))
        time.sleep(timeout_s)

    def sync(self, _emit: Any, _on_count: Any) -> None:
        pass

    def stats(self) -> InputStats:
        return InputStats(connections=5, events_lost=2)

    def close(self) -> None:
        pass


def run(seconds: float, every: float | None) -> list[str]:
    log = io.StringIO()
    run = TraceRun(
        inputs=[ScriptedInput()],
        outputs=[],
        display=PlainLog(log),
        duration=seconds,
        stdout=io.StringIO(),
        stderr=io.StringIO(),
        summary_every=every,
    )
    assert run.run() == 0
    return [line for line in log.getvalue().splitlines() if "summary" in line]


def test_a_summary_line_comes_every_interval_with_the_runs_totals() -> None:
    lines = run(2.3, every=0.5)
    assert 3 <= len(lines) <= 5, lines  # at 0.5, 1.0, 1.5, 2.0 s; a loaded machine may skip one
    rss_mb = psutil.Process().memory_info().rss / 1048576
    for line in lines:
        match = LINE.fullmatch(line)
        assert match, line
        assert match.group(1, 2, 3) == ("2", "5", "2")
        assert abs(int(match.group(4)) - rss_mb) < max(10, rss_mb * 0.2), (line, rss_mb)
    ups = [LINE.fullmatch(line).group(5) for line in lines]  # type: ignore[union-attr]
    assert ups[0] == "0:00:00" and ups[-1] in ("0:00:01", "0:00:02")


def test_without_the_option_no_summary_line() -> None:
    assert run(1.2, every=None) == []


def test_the_live_table_shows_no_summary_line() -> None:
    from rich.console import Console

    from egress_auditor.capture.flows import FlowTable

    out = io.StringIO()
    LiveTable(Console(file=out), FlowTable()).summary("egress-auditor: summary: 1 flows")
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00:00"), (59.9, "0:00:59"), (600, "0:10:00"), (86399, "23:59:59"), (6 * 86400 + 7800, "6d 02:10:00")],
)
def test_time_up_reads_as_days_and_a_clock(seconds: float, text: str) -> None:
    assert time_span(seconds) == text
