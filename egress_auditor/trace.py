"""The trace run: wires inputs, attribution, the flow table, outputs and the
display; owns signals and the clock; always ends with the rules on stdout."""

from __future__ import annotations

import dataclasses
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

from egress_auditor.flows import FlowTable
from egress_auditor.inputs import InputStats
from egress_auditor.model import Connection, Flow, FlowKey, Summary
from egress_auditor.process import ProcessResolver

RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
POLL_S = 0.1
SYNC_S = 1.0


@dataclass
class TraceRun:
    inputs: list[Any]
    outputs: list[Any]
    display: Any
    duration: float | None = None
    count: int | None = None
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    resolver: ProcessResolver = field(default_factory=ProcessResolver)
    table: FlowTable = field(default_factory=FlowTable)

    def __post_init__(self) -> None:
        self._stop_reason: str | None = None
        self._attach: list[str] = []
        self._output_errors: dict[str, str] = {}
        self._started = time.time()

    # -- signals -------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_reason = signal.Signals(signum).name

    def _install_signals(self) -> dict[int, Any]:
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    # -- events --------------------------------------------------------------
    def _receive(self, conn: Connection) -> None:
        process = self.resolver.resolve(conn.pid, conn.comm, conn.uid, conn.time)
        conn = dataclasses.replace(conn, process=process)
        flow, is_new = self.table.add(conn)
        for sink in (*self.outputs, self.display):
            self._deliver(sink, lambda s: s.connection(conn, flow, is_new))

    def _deliver(self, sink: Any, call: Callable[[Any], None]) -> None:
        name = getattr(sink, "name", type(sink).__name__)
        try:
            call(sink)
        except Exception as exc:  # one failing output never stops the others
            if name not in self._output_errors:
                self._output_errors[name] = f"{type(exc).__name__}: {exc}"
                print(f"egress-auditor: output {name} failed: {exc}", file=self.stderr)

    def _on_count(self, key: FlowKey, count: int, last_seen: float) -> None:
        self.table.set_kernel_count(key, count, last_seen)

    def _sync(self) -> None:
        for source in self.inputs:
            source.sync(self._receive, self._on_count)

    def stats(self) -> InputStats:
        total = InputStats()
        for source in self.inputs:
            s = source.stats()
            total.connects += s.connects
            total.events_lost += s.events_lost
            total.map_full += s.map_full
        return total

    def status(self, now: float) -> dict[str, str]:
        s = self.stats()
        elapsed = now - self._started
        remaining = f"{max(0.0, self.duration - elapsed):.0f}s" if self.duration else "until ctrl-c"
        return {
            "attach": "; ".join(self._attach),
            "elapsed": f"{elapsed:.0f}s",
            "remaining": remaining,
            "flows": str(len(self.table)),
            "connections": str(max(s.connects, self.table.connects)),
            "lost events": str(s.events_lost),
        }

    # -- the run -------------------------------------------------------------
    def run(self) -> int:
        previous = self._install_signals()
        running = False
        try:
            for source in self.inputs:
                self._attach.append(f"{source.name}: {source.open()}")
                print(
                    f"egress-auditor: {source.name} input attached: {self._attach[-1].split(': ', 1)[1]}",
                    file=self.stderr,
                )
            self._started = time.time()
            print(RUNNING_LINE, file=self.stderr, flush=True)
            running = True
            self.display.start(self.status(self._started))
            self._loop()
        finally:
            # Whatever ended a started run, the flows seen so far become rules;
            # a run that never started prints none (an empty ruleset is not "nothing seen").
            for signum in previous:
                signal.signal(signum, signal.SIG_IGN)
            try:
                if running:
                    self._finish()
                else:
                    self._close_inputs()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        return 0

    def _loop(self) -> None:
        next_sync = time.monotonic() + SYNC_S
        while self._stop_reason is None:
            now = time.time()
            if self.duration is not None and now - self._started >= self.duration:
                self._stop_reason = "duration"
                break
            for source in self.inputs:
                source.poll(POLL_S / len(self.inputs), self._receive)
            if time.monotonic() >= next_sync:
                began = time.monotonic()
                self._sync()
                # Reading a large kernel map costs: never spend more than a tenth of the time on it.
                cost = time.monotonic() - began
                next_sync = time.monotonic() + max(SYNC_S, 10 * cost)
            if self.count is not None and self._connects() >= self.count:
                self._stop_reason = "count"
            self.display.refresh(self.status(time.time()))

    def _close_inputs(self) -> None:
        for source in self.inputs:
            try:
                source.close()
            except Exception as exc:
                print(f"egress-auditor: closing {source.name} failed: {exc}", file=self.stderr)

    def _connects(self) -> int:
        return max(self.stats().connects, self.table.connects)

    def _finish(self) -> None:
        for source in self.inputs:
            try:
                source.poll(0, self._receive)
            except Exception as exc:
                print(f"egress-auditor: draining {source.name} failed: {exc}", file=self.stderr)
        try:
            self._sync()
        except Exception as exc:
            print(f"egress-auditor: reading kernel counts failed: {exc}", file=self.stderr)
        ended = time.time()
        status = self.status(ended)
        stats = self.stats()
        self.display.refresh(status)
        self.display.stop()
        self._close_inputs()
        summary = Summary(
            started=self._started,
            ended=ended,
            host=socket.gethostname(),
            inputs=[s.name for s in self.inputs],
            attach="; ".join(self._attach) or "none",
            connects=max(stats.connects, self.table.connects),
            events_lost=stats.events_lost,
            map_full=stats.map_full,
        )
        flows: list[Flow] = list(self.table)
        texts: list[str] = []
        for sink in self.outputs:
            self._deliver(sink, lambda s: texts.append(s.finish(flows, summary)))
        # One write, so a redirect never holds half the rules.
        self.stdout.write("".join(texts))
        self.stdout.flush()
        reason = {"duration": "duration reached", "count": "count reached"}.get(
            self._stop_reason or "", self._stop_reason or "stopped"
        )
        print(
            f"egress-auditor: stopped ({reason}): {len(flows)} flows, {summary.connects} connections, "
            f"{summary.events_lost} events lost",
            file=self.stderr,
        )
