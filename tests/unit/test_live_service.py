"""The live table names each flow's service or container, escaped for the terminal."""

from __future__ import annotations

import dataclasses
import io

from flowdata import START, conn, proc
from rich.console import Console

from egress_auditor.capture.flows import FlowTable
from egress_auditor.display.live import LiveTable


def test_the_live_table_has_a_service_column() -> None:
    table = FlowTable()
    nginx = dataclasses.replace(proc(700, "nginx", 33, "www-data"), service="nginx.service")
    odd = dataclasses.replace(proc(701, "odd", 33, "www-data"), service="evil\x1b[2J.service")
    table.add(conn(nginx, "192.0.2.10", 443, START))
    table.add(conn(odd, "192.0.2.11", 443, START))
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    console.print(LiveTable(console, table)._render())
    text = out.getvalue()
    assert "service" in text.splitlines()[2]  # the header row
    assert "nginx.service" in text
    assert "evil\\x1b[2J.service" in text and "\x1b" not in text
