"""Outputs receive every connection and, at the end, every flow.

An output provides connection(conn, flow, is_new) and finish(flows, summary),
which returns the text for stdout (or "") and may write files of its own.
One that writes files also provides snapshot(flows, summary): what finish
would write there now, nothing on stdout. Firewall outputs get every flow,
resumed runs' included; one with `per_run = True` (json, loki) gets this
run's own flows and summary. Outputs never change what they receive.
"""

from __future__ import annotations

from typing import Protocol as Interface

from egress_auditor.model import Connection, Flow, Summary


class Output(Interface):
    name: str

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None: ...

    def finish(self, flows: list[Flow], summary: Summary) -> str: ...
