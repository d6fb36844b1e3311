"""Outputs: what a run leaves behind.

In: every `Connection` event as it comes and, at the end (or a snapshot), every `Flow` with the run's
`Summary`. Out: rules text for stdout (iptables, nftables, with rules/), records (json, loki), files.

`Output` is what a trace run asks of an output; `OutputBase` gives the
optional methods their defaults. An output returns the text for stdout from
finish() (or "") and may write files of its own; one that writes files also
writes, at snapshot(), what finish would write there now. Firewall outputs
get every flow, resumed runs' included; one with `per_run = True` (json,
loki) gets this run's own flows and summary. Outputs never change what they
receive.
"""

from __future__ import annotations

from typing import Protocol

from egress_auditor.model import Connection, Flow, Summary


class Output(Protocol):
    name: str  # the plugin's name, as in -o NAME
    per_run: bool  # True: gets this run's flows alone (record streams); False: resumed runs' too

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None:
        """Each connection as it is recorded; is_new: the first of its flow."""
        ...

    def finish(self, flows: list[Flow], summary: Summary) -> str:
        """The end of the run: returns the text for stdout (or "") and may write files of its own."""
        ...

    def reopen(self) -> None:
        """SIGHUP: open files again by their path (after log rotation)."""
        ...

    def drift(self, conn: Connection, flow: Flow) -> None:
        """A new flow that `trace --baseline` does not cover, right after its connection() call."""
        ...

    def snapshot(self, flows: list[Flow], summary: Summary) -> None:
        """--snapshot-every or SIGUSR1: write what finish() would write to files now, nothing to stdout."""
        ...


class OutputBase:
    """Defaults for an output's optional methods."""

    name = ""
    per_run = False

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None:
        """Nothing to do per event: rules are rendered from the final flows."""

    def reopen(self) -> None:
        """No file kept open between events."""

    def drift(self, conn: Connection, flow: Flow) -> None:
        """Drift shows in the final rules alone."""

    def snapshot(self, flows: list[Flow], summary: Summary) -> None:
        """No files to keep current."""
