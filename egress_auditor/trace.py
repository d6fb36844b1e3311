"""The trace run: wires inputs, attribution, the flow table, outputs and the
display; owns signals and the clock; always ends with the rules on stdout.

Each turn of the loop polls the inputs (connections are only queued), then
applies the process lineage the kernel wrote meanwhile, then attributes the
queued connections: an exec that happened before a connect is always known
by the time that connect is attributed.

With a command (`trace -- CMD`), only connections from the command's cgroup
are recorded, the run ends when the command exits, and its exit status is
the run's. Stop signals are then taken with sigtimedwait: one sent by the
terminal already reached the command (same process group), one sent by
kill(1) is passed on to it; the rules follow once the command has exited.
"""

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

from egress_auditor import host
from egress_auditor.cgroups import CgroupResolver
from egress_auditor.command import STOP_SIGNALS, AuditedCommand, CommandError
from egress_auditor.escape import terminal_text
from egress_auditor.flows import FlowTable
from egress_auditor.inputs import InputStats
from egress_auditor.model import Connection, Flow, FlowKey, Summary
from egress_auditor.process import Attributor, ProcessResolver

RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
POLL_S = 0.1
SYNC_S = 1.0
SYNC_SHARE = 0.005  # of the time, at most, spent folding kernel counts (CPU taken from the traced work)
SYNC_MAX_S = 10.0  # but no longer between syncs: counts shown stay this fresh

STATUS_S = 0.25  # the status reads kernel counters: as often as the live table redraws, no more
SI_KERNEL = 0x80  # si_code of a signal the terminal sent to its foreground process group
KILL_AFTER_SIGNALS = 3  # stop requests the command may ignore before its cgroup is killed
TERM_GRACE_S = 5.0  # after --duration/--count ends a command's run: SIGTERM, then SIGKILL this much later


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
    lineage: Any = None  # lineage.LineageTracer; None: /proc at event time only
    command: AuditedCommand | None = None
    cgroups: CgroupResolver = field(default_factory=CgroupResolver)

    def __post_init__(self) -> None:
        self._stop_reason: str | None = None
        self._reopen_requested = False
        self._attach: list[str] = []
        self._output_errors: dict[str, str] = {}
        self._started = time.time()
        self._queued: list[Connection] = []
        self._outside = 0  # connections from outside the command's cgroup, not recorded
        self._stop_requests = 0
        self._term_sent: float | None = None
        self._exit_status = 0
        self.attributor = Attributor(None, self.resolver, self.cgroups)

    # -- signals -------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_reason = signal.Signals(signum).name

    def _on_hangup(self, _signum: int, _frame: FrameType | None) -> None:
        self._reopen_requested = True

    def _install_signals(self) -> dict[int, Any]:
        previous = {}
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, self._on_signal)
        # SIGHUP asks outputs to reopen their files (logrotate); it does not end the run.
        previous.setdefault(signal.SIGHUP, signal.signal(signal.SIGHUP, self._on_hangup))
        if self.command is not None:
            # Held pending and read in the loop, so each can be told apart by its sender.
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        return previous

    def _take_signals(self) -> None:
        """With a command: pass stop signals on to it (it ends the run by exiting)."""
        while True:
            info = signal.sigtimedwait(STOP_SIGNALS, 0)
            if info is None:
                return
            assert self.command is not None
            if self.command.poll() is not None:
                self._stop_reason = signal.Signals(info.si_signo).name
                continue
            self._stop_requests += 1
            if self._stop_requests >= KILL_AFTER_SIGNALS:
                print("egress-auditor: the command ignores stop signals: killing its cgroup", file=self.stderr)
                self.command.kill_all()
            elif info.si_code != SI_KERNEL:
                self.command.send(info.si_signo)

    # -- events --------------------------------------------------------------
    def _receive(self, conn: Connection) -> None:
        if self.command is not None and not self.command.owns(conn.cgroup_id, self.cgroups):
            self._outside += conn.repeats
            return
        conn = dataclasses.replace(conn, process=self.attributor.attribute(conn))
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

    def _reopen_outputs(self) -> None:
        self._reopen_requested = False
        for sink in self.outputs:
            if hasattr(sink, "reopen"):
                self._deliver(sink, lambda s: s.reopen())

    def _on_count(self, key: FlowKey, count: int, last_seen: float) -> None:
        self.table.set_kernel_count(key, count, last_seen)

    def _sync(self) -> None:
        for source in self.inputs:
            source.sync(self._receive, self._on_count)

    def _poll(self, timeout_s: float) -> None:
        """Connections first (queued), then the lineage written meanwhile, then attribution."""
        for source in self.inputs:
            source.poll(timeout_s, self._queued.append)
        if self.lineage is not None:
            self.lineage.consume()
        queued, self._queued = self._queued, []
        for conn in queued:
            self._receive(conn)

    def stats(self) -> InputStats:
        total = InputStats()
        for source in self.inputs:
            s = source.stats()
            total.connects += s.connects
            total.events_lost += s.events_lost
            total.map_full += s.map_full
        return total

    def status(self, now: float, s: InputStats | None = None) -> dict[str, str]:
        s = self.stats() if s is None else s
        elapsed = now - self._started
        remaining = f"{max(0.0, self.duration - elapsed):.0f}s" if self.duration else "until ctrl-c"
        return {
            "attach": "; ".join(self._attach),
            "elapsed": f"{elapsed:.0f}s",
            "remaining": remaining,
            "flows": str(len(self.table)),
            "connections": str(self._connects_from(s)),
            "lost events": str(s.events_lost),
        }

    # -- the run -------------------------------------------------------------
    def run(self) -> int:
        """The whole run; returns the exit status (the command's, with one)."""
        previous = self._install_signals()
        running = False
        try:
            if self.command is not None:
                cgroup = self.command.prepare()
                for source in self.inputs:
                    # Inputs that can filter in the kernel keep the command's flows apart from the host's.
                    if hasattr(source, "restrict_to_cgroup"):
                        source.restrict_to_cgroup(cgroup.id, cgroup.depth)
            for source in self.inputs:
                self._attach.append(f"{source.name}: {source.open()}")
                print(
                    f"egress-auditor: {source.name} input attached: {self._attach[-1].split(': ', 1)[1]}",
                    file=self.stderr,
                )
            self._open_lineage()
            host.release_freed_heap()
            if self.command is not None:
                self._stop_if_signalled()
                self.command.start(unblock=set(STOP_SIGNALS))
                print(
                    f"egress-auditor: following the command (pid {self.command.pid}) in cgroup "
                    f"{terminal_text(self.command.cgroup.relative if self.command.cgroup else '?')}",
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
                if self.command is not None:
                    self.command.cleanup()
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
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
        self.attributor.lineage = self.lineage.table
        self._attach.append(f"lineage: {what}")
        print(f"egress-auditor: process lineage attached: {what}", file=self.stderr)

    def _stop_if_signalled(self) -> None:
        """A stop signal held while the BPF programs loaded: the command was not running to get it."""
        pending = signal.sigpending() & set(STOP_SIGNALS)
        if pending:
            signum = min(pending)
            signal.sigtimedwait({signum}, 0)
            name = signal.Signals(signum).name
            raise CommandError(f"stopped by {name} before the command started", 128 + signum)

    def _check_command(self) -> None:
        assert self.command is not None
        self._take_signals()
        status = self.command.poll()
        if status is not None:
            self._exit_status = status
            self._stop_reason = "command exited"
            return
        if self._term_sent is not None and time.monotonic() - self._term_sent > TERM_GRACE_S:
            self.command.kill_all()

    def _loop(self) -> None:
        next_sync = time.monotonic() + SYNC_S
        synced_at = time.monotonic()
        lost_at_sync = 0
        next_status = 0.0
        while self._stop_reason is None:
            now = time.time()
            if self._reopen_requested:
                self._reopen_outputs()
            if self.command is not None:
                self._check_command()
                if self._stop_reason is not None:
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
            if self.count is not None and self._connects() >= self.count:
                self._end_command("count")
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_S
                stats = self.stats()
                self.display.refresh(self.status(time.time(), stats))
                # Flows whose first event was lost exist only in the kernel map until a sync: go soon.
                if stats.events_lost > lost_at_sync:
                    next_sync = min(next_sync, synced_at + SYNC_S)

    def _end_command(self, reason: str) -> bool:
        """--duration or --count reached: stop now, or first ask the command to end (True: stop now)."""
        if self.command is None or self.command.poll() is not None:
            self._stop_reason = reason
            return True
        if self._term_sent is None:
            self._term_sent = time.monotonic()
            self.command.send(signal.SIGTERM)
        return False

    def _close_inputs(self) -> None:
        for source in [*self.inputs, *([self.lineage] if self.lineage is not None else [])]:
            try:
                source.close()
            except Exception as exc:
                print(f"egress-auditor: closing {source.name} failed: {exc}", file=self.stderr)

    def _connects(self) -> int:
        return self._connects_from(self.stats())

    def _connects_from(self, stats: InputStats) -> int:
        # With a command, the kernel's host-wide count says nothing about it.
        return self.table.connects if self.command is not None else max(stats.connects, self.table.connects)

    def _finish(self) -> None:
        try:
            self._poll(0)
        except Exception as exc:
            print(f"egress-auditor: draining the buffers failed: {exc}", file=self.stderr)
        try:
            self._sync()
        except Exception as exc:
            print(f"egress-auditor: reading kernel counts failed: {exc}", file=self.stderr)
        ended = time.time()
        stats = self.stats()  # one read: the last status line and the summary give the same counts
        status = self.status(ended, stats)
        self.display.refresh(status)
        self.display.stop()
        self._close_inputs()
        summary = Summary(
            started=self._started,
            ended=ended,
            host=socket.gethostname(),
            inputs=[s.name for s in self.inputs],
            attach="; ".join(self._attach) or "none",
            connects=self._connects_from(stats),
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
        if self.command is not None:
            reason += f", exit status {self._exit_status}; {self._outside} connections from outside it not recorded"
        print(
            f"egress-auditor: stopped ({reason}): {len(flows)} flows, {summary.connects} connections, "
            f"{summary.events_lost} events lost",
            file=self.stderr,
        )
