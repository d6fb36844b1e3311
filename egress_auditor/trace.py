"""The trace run: wires inputs, attribution, the flow table, outputs and the
display; owns signals and the clock; always ends with the rules on stdout.

Each turn of the loop polls the inputs (connections are only queued), then
applies the process lineage the kernel wrote meanwhile, then passes the
queued connections through the enrichers (enrich.py: the command's filter,
the process, the DNS name): an exec that happened before a connect is always
known by the time that connect is attributed, and so is a DNS answer read in
the same poll.

With a command (`trace -- CMD`), a CommandSupervisor (supervisor.py) starts
it, takes the stop signals meant for it, and its exit ends the run.

A run may carry on from earlier captures (`--resume`): their flows are merged
into what the firewall outputs write, while the json and loki outputs record
this run's own part (readers merge runs). Snapshots (`--snapshot-every`,
SIGUSR1) give every output what a stop at that moment would give it.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import psutil

from egress_auditor.attribution.cgroups import CgroupResolver
from egress_auditor.attribution.enrich import DnsNaming, Enricher, Enrichment, ProcessDetail
from egress_auditor.attribution.names import DnsNames
from egress_auditor.attribution.process import Attributor, ProcessResolver
from egress_auditor.capture.drift import EXIT_DRIFT, DriftWatch
from egress_auditor.capture.flows import FlowTable
from egress_auditor.capture.reader import Capture
from egress_auditor.capture.views import Views, run_views
from egress_auditor.command import STOP_SIGNALS, AuditedCommand
from egress_auditor.display.live import Display
from egress_auditor.host import actions
from egress_auditor.inputs import Input, InputStats
from egress_auditor.model import Connection, FlowKey, Summary
from egress_auditor.outputs import Output
from egress_auditor.supervisor import CommandSupervisor

if TYPE_CHECKING:
    from egress_auditor.attribution.lineage_tracer import LineageTracer

RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
POLL_S = 0.1
SYNC_S = 1.0
SYNC_SHARE = 0.005  # of the time, at most, spent folding kernel counts (CPU taken from the traced work)
SYNC_MAX_S = 10.0  # but no longer between syncs: counts shown stay this fresh
STATUS_S = 0.25  # the status reads kernel counters: as often as the live table redraws, no more


def time_span(seconds: float) -> str:
    """`0:10:00`, `6d 02:10:00`."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}" if days else f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


@dataclass
class TraceRun:
    inputs: list[Input]
    outputs: list[Output]
    display: Display
    duration: float | None = None
    count: int | None = None
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    resolver: ProcessResolver = field(default_factory=ProcessResolver)
    table: FlowTable = field(default_factory=FlowTable)
    lineage: LineageTracer | None = None  # None: /proc at event time only
    command: AuditedCommand | None = None
    cgroups: CgroupResolver = field(default_factory=CgroupResolver)
    drift: DriftWatch | None = None  # with a baseline: report and write rules for what it does not cover
    redact: bool = True  # secrets in command lines become *** before any output sees them
    snapshot_every: float | None = None  # seconds between snapshots (SIGUSR1 asks for one at any time)
    resumed: Capture | None = None  # flows of earlier runs this one carries on from
    summary_every: float | None = None  # seconds between summary lines (a log has no live table)
    attributor: Attributor | None = None  # who made a connection: by default the lineage, /proc, cgroups

    def __post_init__(self) -> None:
        self._stop_reason: str | None = None
        self._reopen_requested = False
        self._snapshot_requested = False
        self._attach: list[str] = []
        self._output_errors: dict[str, str] = {}
        self._started = time.time()
        self._queued: list[Connection] = []
        self._exit_status = 0
        if self.attributor is None:
            self.attributor = Attributor(None, self.resolver, self.cgroups)
        self.names = DnsNames()  # fed by the inputs that read DNS answers
        self.supervisor = (
            CommandSupervisor(self.command, self.cgroups, self.stderr) if self.command is not None else None
        )
        enrichers: list[Enricher] = [self.supervisor.filter] if self.supervisor is not None else []
        enrichers += [ProcessDetail(self.attributor, self.redact), DnsNaming(self.names)]
        self.enrichment = Enrichment(enrichers)

    # -- signals -------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_reason = signal.Signals(signum).name

    def _on_hangup(self, _signum: int, _frame: FrameType | None) -> None:
        self._reopen_requested = True

    def _on_snapshot(self, _signum: int, _frame: FrameType | None) -> None:
        self._snapshot_requested = True

    def _install_signals(self) -> dict[int, Any]:
        previous = {}
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, self._on_signal)
        # SIGHUP asks outputs to reopen their files (logrotate); it does not end the run.
        previous.setdefault(signal.SIGHUP, signal.signal(signal.SIGHUP, self._on_hangup))
        previous.setdefault(signal.SIGUSR1, signal.signal(signal.SIGUSR1, self._on_snapshot))
        if self.supervisor is not None:
            self.supervisor.hold_signals()
        return previous

    # -- events --------------------------------------------------------------
    def _receive(self, received: Connection) -> None:
        conn = self.enrichment.enrich(received)
        if conn is None:
            return
        flow, is_new = self.table.add(conn)
        if flow is None:  # past twice the flow cap: counted, and the rules' header says so
            return
        for sink in (*self.outputs, self.display):
            self._deliver(sink, lambda s: s.connection(conn, flow, is_new))
        if is_new and self.drift is not None and not self.drift.covers(flow):
            for sink in (*self.outputs, self.display):
                self._deliver(sink, lambda s: s.drift(conn, flow))

    def _deliver(self, sink: Output | Display, call: Callable[[Any], None]) -> None:
        name = sink.name
        try:
            call(sink)
        except Exception as exc:  # one failing output never stops the others
            if name not in self._output_errors:
                self._output_errors[name] = f"{type(exc).__name__}: {exc}"
                print(f"egress-auditor: output {name} failed: {exc}", file=self.stderr)

    def _reopen_outputs(self) -> None:
        self._reopen_requested = False
        for sink in self.outputs:
            self._deliver(sink, lambda s: s.reopen())

    def _on_count(self, key: FlowKey, added: int, last_seen: float) -> None:
        self.table.add_kernel_count(key, added, last_seen)

    def _sync(self) -> None:
        for input_ in self.inputs:
            input_.sync(self._receive, self._on_count)

    def _sync_at_end(self) -> None:
        """The last counts before a stop or a snapshot writes; those of the last sync if they cannot be read."""
        try:
            self._sync()
        except Exception as exc:
            print(f"egress-auditor: reading kernel counts failed: {exc}", file=self.stderr)

    def _poll(self, timeout_s: float) -> None:
        """Connections first (queued), then the lineage written meanwhile, then attribution."""
        for input_ in self.inputs:
            input_.poll(timeout_s, self._queued.append)
        if self.lineage is not None:
            self.lineage.consume()
        queued, self._queued = self._queued, []
        for conn in queued:
            self._receive(conn)

    def stats(self) -> InputStats:
        total = InputStats()
        for input_ in self.inputs:
            s = input_.stats()
            total.connections += s.connections
            total.events_lost += s.events_lost
            total.map_full += s.map_full
        return total

    def status(self, now: float, s: InputStats | None = None) -> dict[str, str]:
        s = self.stats() if s is None else s
        elapsed = now - self._started
        remaining = f"{max(0.0, self.duration - elapsed):.0f}s" if self.duration else "until ctrl-c"
        return {
            # Short: the detail is in the attach lines, doctor and the rules' header.
            "attach": "; ".join(f"{s.name}: {s.path}" if getattr(s, "path", "") else s.name for s in self.inputs),
            "elapsed": f"{elapsed:.0f}s",
            "remaining": remaining,
            "flows": str(len(self.table)),
            "connections": str(self._connections_from(s)),
            "lost events": str(s.events_lost),
        }

    def summary_line(self, stats: InputStats) -> str:
        """What a log of a long run needs now and then: totals, losses, memory, time up."""
        rss_mb = psutil.Process().memory_info().rss / 1048576
        return (
            f"egress-auditor: summary: {len(self.table)} flows, {self._connections_from(stats)} connections, "
            f"{stats.events_lost} events lost, {rss_mb:.0f} MB resident, up {time_span(time.time() - self._started)}"
        )

    def _summarise(self) -> None:
        line = self.summary_line(self.stats())
        self._deliver(self.display, lambda d: d.summary(line))

    # -- the run -------------------------------------------------------------
    def run(self) -> int:
        """The whole run; returns the exit status (the command's, with one)."""
        previous = self._install_signals()
        running = False
        try:
            if self.supervisor is not None:
                self.supervisor.prepare(self.inputs)
            for input_ in self.inputs:
                input_.learn_names(self.names)
                self._attach.append(f"{input_.name}: {input_.open()}")
                print(
                    f"egress-auditor: {input_.name} input attached: {self._attach[-1].split(': ', 1)[1]}",
                    file=self.stderr,
                )
            self._open_lineage()
            actions.release_freed_heap()
            if self.supervisor is not None:
                self.supervisor.start()
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
                if self.supervisor is not None:
                    self.supervisor.cleanup()
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        return self._exit_status

    def _open_lineage(self) -> None:
        if self.lineage is None:
            return
        try:
            what = self.lineage.open()
        except Exception as exc:  # attribution falls back to /proc: the run itself can go on
            print(f"egress-auditor: process lineage unavailable ({exc}): reading /proc instead", file=self.stderr)
            self.lineage = None
            return
        assert self.attributor is not None  # made in __post_init__
        self.attributor.lineage = self.lineage.table
        self._attach.append(f"lineage: {what}")
        print(f"egress-auditor: process lineage attached: {what}", file=self.stderr)

    def _loop(self) -> None:
        next_sync = time.monotonic() + SYNC_S
        synced_at = time.monotonic()
        lost_at_sync = 0
        next_status = 0.0
        next_snapshot = time.monotonic() + (self.snapshot_every or 0.0)
        next_summary = time.monotonic() + self.summary_every if self.summary_every else None
        while self._stop_reason is None:
            now = time.time()
            if self._reopen_requested:
                self._reopen_outputs()
            if self._snapshot_requested or (self.snapshot_every and time.monotonic() >= next_snapshot):
                self._snapshot()
                next_snapshot = time.monotonic() + (self.snapshot_every or 0.0)
            if self.supervisor is not None:
                status = self.supervisor.check()
                if status is not None:
                    self._exit_status, self._stop_reason = status, "command exited"
                    break
            if self.duration is not None and now - self._started >= self.duration:
                if self._end_command("duration"):
                    break
            self._poll(POLL_S / max(1, len(self.inputs)))
            if time.monotonic() >= next_sync:
                began = time.monotonic()
                lost_at_sync = self.stats().events_lost
                self._sync()
                # Reading a large kernel map costs, and the CPU it takes is taken from the work being
                # watched: never spend more than SYNC_SHARE of the time on it, nor wait over SYNC_MAX_S.
                cost = time.monotonic() - began
                synced_at = time.monotonic()
                next_sync = synced_at + min(SYNC_MAX_S, max(SYNC_S, cost / SYNC_SHARE))
            if self.count is not None and self._connections_from(self.stats()) >= self.count:
                self._end_command("count")
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_S
                stats = self.stats()
                self.display.refresh(self.status(time.time(), stats))
                # Flows whose first event was lost exist only in the kernel map until a sync: go soon.
                if stats.events_lost > lost_at_sync:
                    next_sync = min(next_sync, synced_at + SYNC_S)
            if next_summary is not None and self.summary_every and time.monotonic() >= next_summary:
                # On the interval's grid, so lines stay evenly spaced; a stalled loop skips, never bunches.
                next_summary = max(next_summary + self.summary_every, time.monotonic())
                self._summarise()

    def _end_command(self, reason: str) -> bool:
        """--duration or --count reached: stop now, or first ask the command to end (True: stop now)."""
        if self.supervisor is None or self.supervisor.end():
            self._stop_reason = reason
            return True
        return False

    def _close_inputs(self) -> None:
        for opened in [*self.inputs, *([self.lineage] if self.lineage is not None else [])]:
            try:
                opened.close()
            except Exception as exc:
                print(f"egress-auditor: closing {opened.name} failed: {exc}", file=self.stderr)

    def _connections_from(self, stats: InputStats) -> int:
        # With a command, the kernel's host-wide count says nothing about it.
        return self.table.connections if self.supervisor is not None else max(stats.connections, self.table.connections)

    def _views(self, ended: float, stats: InputStats) -> Views:
        """This run's flows and summary, with the resumed runs and the baseline applied for the rules."""
        summary = Summary(
            started=self._started,
            ended=ended,
            host=socket.gethostname(),
            inputs=[s.name for s in self.inputs],
            attach="; ".join(self._attach) or "none",
            connections=self._connections_from(stats),
            events_lost=stats.events_lost,
            map_full=stats.map_full,
            notes=self.table.limits.notes(self.table.cap),
        )
        return run_views(list(self.table), summary, self.resumed, self.drift)

    def _snapshot(self) -> None:
        """What a stop now would write, written now by every output that writes files."""
        self._snapshot_requested = False
        self._sync_at_end()
        views = self._views(time.time(), self.stats())
        for sink in self.outputs:
            try:
                sink.snapshot(*views.for_sink(sink))
            except Exception as exc:  # a full disk: what the last snapshot wrote stays, the run goes on
                name = sink.name or type(sink).__name__
                print(f"egress-auditor: snapshot of output {name} not written: {exc}", file=self.stderr, flush=True)

    def _finish(self) -> None:
        try:
            self._poll(0)
        except Exception as exc:
            print(f"egress-auditor: draining the buffers failed: {exc}", file=self.stderr)
        self._sync_at_end()
        ended = time.time()
        stats = self.stats()  # one read: the last status line and the summary give the same counts
        self.display.refresh(self.status(ended, stats))
        self.display.stop()
        self._close_inputs()
        views = self._views(ended, stats)
        flows, summary, drifted = views.everything, views.rules.summary, views.drifted
        texts: list[str] = []
        for sink in self.outputs:
            self._deliver(sink, lambda s: texts.append(s.finish(*views.for_sink(s))))
        # One write, so a redirect never holds half the rules.
        self.stdout.write("".join(texts))
        self.stdout.flush()
        reason = {"duration": "duration reached", "count": "count reached"}.get(
            self._stop_reason or "", self._stop_reason or "stopped"
        )
        if self.supervisor is not None:
            reason += self.supervisor.outcome(self._exit_status)
        if self.resumed is not None:
            reason += f"; with {len(self.resumed.flows)} flows of {self.resumed.runs} earlier run(s) resumed"
        print(
            f"egress-auditor: stopped ({reason}): {len(flows)} flows, {summary.connections} connections, "
            f"{summary.events_lost} events lost"
            + (f", {len(drifted)} drifted from the baseline" if drifted is not None else ""),
            file=self.stderr,
        )
        if drifted and self._exit_status == 0:
            self._exit_status = EXIT_DRIFT
