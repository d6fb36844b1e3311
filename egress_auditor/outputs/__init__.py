"""Outputs receive every connection and, at the end, every flow.

`Output` is what a trace run asks of an output; `OutputBase` gives the
optional methods their defaults. Outputs never change what they receive.
"""

from __future__ import annotations

from typing import Protocol

from egress_auditor.model import Connection, Flow, Summary


class Output(Protocol):
    name: str  # the plugin's name, as in -o NAME

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


class OutputBase:
    """Defaults for an output's optional methods."""

    name = ""

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None:
        """Nothing to do per event: rules are rendered from the final flows."""

    def reopen(self) -> None:
        """No file kept open between events."""

    def drift(self, conn: Connection, flow: Flow) -> None:
        """Drift shows in the final rules alone."""
