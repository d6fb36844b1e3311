"""What the user watches on stderr: a live rich table, or one line per new flow."""

from __future__ import annotations

import time
from typing import IO, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from egress_auditor.capture.flows import FlowTable
from egress_auditor.display.ports import port_label
from egress_auditor.escape import terminal_text
from egress_auditor.model import Connection, Flow, FlowKey, Transport


class Display(Protocol):
    """What a trace run shows while it runs; `status` maps a label to its value."""

    name: str

    def start(self, status: dict[str, str]) -> None: ...

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None: ...

    def drift(self, conn: Connection, flow: Flow) -> None: ...

    def refresh(self, status: dict[str, str]) -> None: ...

    def stop(self) -> None: ...


def endpoint(address: object, port: int, protocol: Transport, named: bool = False) -> str:
    host = f"[{address}]" if ":" in str(address) else str(address)
    label = port_label(port, protocol) if named else str(port)
    return f"{host}:{label}"


def new_flow_line(conn: Connection) -> str:
    """`new TCP connection 10.0.0.2:40112 -> 10.0.0.1:443(https) by curl`, escaped; without the
    source where it is unknown (the cgroup hooks and kprobes run before it is chosen)."""
    src = endpoint(conn.src, conn.sport, conn.protocol) if conn.src and conn.sport else str(conn.src or "")
    user = conn.process.user or str(conn.uid)
    name = f" ({terminal_text(conn.hostname)})" if conn.hostname else ""
    return (
        f"new {conn.protocol.name} connection {src + ' ' if src else ''}-> "
        f"{endpoint(conn.dst, conn.dport, conn.protocol, named=True)}{name} by "
        f"{terminal_text(conn.process.name)} (pid {conn.pid or '?'}, user {terminal_text(user)})"
    )


class PlainLog:
    """One line per new flow, for logs and pipes."""

    name = "log"

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def start(self, status: dict[str, str]) -> None:
        pass

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None:
        if is_new:
            print(new_flow_line(conn), file=self.stream, flush=True)

    def drift(self, conn: Connection, flow: Flow) -> None:
        print(f"drift: {new_flow_line(conn)}", file=self.stream, flush=True)

    def refresh(self, status: dict[str, str]) -> None:
        pass

    def summary(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def stop(self) -> None:
        pass


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(seconds))


class LiveTable:
    """A rich table, one row per flow, redrawn a few times a second."""

    name = "live table"
    MAX_ROWS = 200
    REDRAW_S = 0.25

    def __init__(self, console: Console, table: FlowTable) -> None:
        self.console = console
        self.flows = table
        self.status: dict[str, str] = {}
        self.live: Live | None = None
        self._drawn = 0.0
        self.drifted: set[FlowKey] = set()

    def start(self, status: dict[str, str]) -> None:
        self.status = status
        self.live = Live(
            self._render(),
            console=self.console,
            refresh_per_second=4,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None:
        pass  # the table is redrawn from the flow table on refresh

    def drift(self, conn: Connection, flow: Flow) -> None:
        self.drifted.add(flow.key)
        # Printed through the live display's console: it goes above the table, which stays whole.
        self.console.print(Text(f"drift: {new_flow_line(conn)}", style="bold red"))

    def refresh(self, status: dict[str, str]) -> None:
        self.status = status
        now = time.monotonic()
        if self.live is not None and now - self._drawn >= self.REDRAW_S:
            self._drawn = now
            self.live.update(self._render())

    def summary(self, line: str) -> None:
        pass  # the table's header shows the same counts, always current

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(self._render(), refresh=True)
            self.live.stop()
            self.live = None

    def _render(self) -> Group:
        header = Text(" | ".join(f"{k}: {v}" for k, v in self.status.items()), style="bold")
        table = Table(expand=False, show_lines=False)
        columns = ("process", "user", "service", "proto", "destination", "name", "count", "first seen", "last seen")
        for column in columns:
            table.add_column(column, justify="right" if column == "count" else "left")
        for flow in self.flows.recent(self.MAX_ROWS):
            key = flow.key
            process = next(iter(flow.processes.values()), None)
            name = process.name if process else key.comm
            user = (process.user if process and process.user else None) or str(key.uid)
            table.add_row(
                Text(f"DRIFT {terminal_text(name)}", style="bold red")
                if key in self.drifted
                else Text(terminal_text(name)),
                Text(terminal_text(user)),
                Text(terminal_text(", ".join(sorted({p.service for p in flow.processes.values() if p.service})))),
                key.protocol.name,
                Text(endpoint(key.dst, key.dport, key.protocol, named=True)),
                Text(terminal_text(", ".join(sorted(flow.hostnames)))),
                str(flow.connections),
                _clock(flow.first_seen),
                _clock(flow.last_seen),
            )
        if len(self.flows) > self.MAX_ROWS:
            table.caption = f"{len(self.flows) - self.MAX_ROWS} older flows not shown"
        return Group(header, table)
