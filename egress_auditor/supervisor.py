"""The audited command through a trace run (`trace -- CMD`): only connections from its cgroup
are recorded, the run ends when it exits, and its exit status is the run's.

Its cgroup is made before the inputs open (they may filter on it in the kernel), and it starts
once they are attached. Stop signals are held pending and taken with sigtimedwait: one sent by
the terminal already reached the command (same process group), one sent by kill(1) is passed on
to it; the rules follow once the command has exited.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from typing import TextIO

from egress_auditor.attribution.cgroups import CgroupResolver
from egress_auditor.attribution.enrich import CommandFilter
from egress_auditor.command import STOP_SIGNALS, AuditedCommand, CommandError
from egress_auditor.escape import terminal_text
from egress_auditor.inputs import Input

SI_KERNEL = 0x80  # si_code of a signal the terminal sent to its foreground process group
KILL_AFTER_SIGNALS = 3  # stop requests the command may ignore before its cgroup is killed
TERM_GRACE_S = 5.0  # after --duration/--count ends a command's run: SIGTERM, then SIGKILL this much later


class CommandSupervisor:
    """Starts the command, passes stop signals on to it, ends it when the run must end, and says how it ended."""

    def __init__(self, command: AuditedCommand, cgroups: CgroupResolver, stderr: TextIO) -> None:
        self.command = command
        self.stderr = stderr
        self.filter = CommandFilter(command, cgroups)  # the first enricher: what is not the command's is dropped
        self._stop_requests = 0
        self._term_sent: float | None = None

    def hold_signals(self) -> None:
        # Held pending and read in check(), so each can be told apart by its sender.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def prepare(self, inputs: Iterable[Input]) -> None:
        """The command's cgroup, before the inputs open."""
        cgroup = self.command.prepare()
        for input_ in inputs:
            # Inputs that can filter in the kernel keep the command's flows apart from the host's.
            input_.restrict_to_cgroup(cgroup.id, cgroup.depth)

    def start(self) -> None:
        self._stop_if_signalled()
        self.command.start(unblock=set(STOP_SIGNALS))
        print(
            f"egress-auditor: following the command (pid {self.command.pid}) in cgroup "
            f"{terminal_text(self.command.cgroup.relative if self.command.cgroup else '?')}",
            file=self.stderr,
        )

    def _stop_if_signalled(self) -> None:
        """A stop signal held while the BPF programs loaded: the command was not running to get it."""
        pending = signal.sigpending() & set(STOP_SIGNALS)
        if pending:
            signum = min(pending)
            signal.sigtimedwait({signum}, 0)
            name = signal.Signals(signum).name
            raise CommandError(f"stopped by {name} before the command started", 128 + signum)

    def check(self) -> int | None:
        """Once a turn: stop signals passed on; the command's exit status once it has exited."""
        self._take_signals()
        status = self.command.poll()
        if status is not None:
            return status
        if self._term_sent is not None and time.monotonic() - self._term_sent > TERM_GRACE_S:
            self.command.kill_all()
        return None

    def _take_signals(self) -> None:
        while True:
            info = signal.sigtimedwait(STOP_SIGNALS, 0)
            if info is None:
                return
            if self.command.poll() is not None:  # exited: check() ends the run now
                continue
            self._stop_requests += 1
            if self._stop_requests >= KILL_AFTER_SIGNALS:
                print("egress-auditor: the command ignores stop signals: killing its cgroup", file=self.stderr)
                self.command.kill_all()
            elif info.si_code != SI_KERNEL:
                self.command.send(info.si_signo)

    def end(self) -> bool:
        """--duration or --count reached: True once the command has exited, else ask it to end."""
        if self.command.poll() is not None:
            return True
        if self._term_sent is None:
            self._term_sent = time.monotonic()
            self.command.send(signal.SIGTERM)
        return False

    def outcome(self, exit_status: int) -> str:
        """What the stop line adds about the command."""
        return f", exit status {exit_status}; {self.filter.outside} connections from outside it not recorded"

    def cleanup(self) -> None:
        """The cgroup removed, and stop signals delivered as usual again."""
        self.command.cleanup()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
