"""JSON Lines output: a `flow` record per new flow as it is seen, a `summary`
record at the end (records.py; schema in egress_auditor/schema/flow-v1.json).

To stdout, or appended to a file that is reopened on SIGHUP so logrotate can
move it away.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from typing import Any, TextIO

from egress_auditor.errors import UsageError
from egress_auditor.model import Connection, Flow, Summary
from egress_auditor.outputs import OutputBase
from egress_auditor.plugins import Option, Plugin
from egress_auditor.records import drift_record, flow_record, line, summary_record


class JsonLinesOutput(OutputBase):
    name = "json"

    def __init__(self, options: dict[str, Any], stdout: TextIO | None = None) -> None:
        self.path: str = options["file"]
        self.run = uuid.uuid4().hex[:16]
        self.host = socket.gethostname()
        self._stdout = stdout or sys.stdout
        try:
            self._file: TextIO | None = self._open() if self.path else None
        except OSError as exc:
            raise UsageError(f"cannot open json:file {self.path!r}: {exc.strerror}") from None

    def _open(self) -> TextIO:
        # Append: a file rotated away and one that is kept across runs both stay whole.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "a", encoding="ascii")

    def _write(self, text: str) -> None:
        stream = self._file or self._stdout
        stream.write(text)  # one write per record: readers never see half a line
        stream.flush()

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None:
        if is_new:
            self._write(line(flow_record(conn, self.run, self.host)))

    def drift(self, conn: Connection, flow: Flow) -> None:
        self._write(line(drift_record(conn, self.run, self.host)))

    def reopen(self) -> None:
        """SIGHUP: close the file and open the path again (a new file after rotation)."""
        if self._file is not None:
            self._file.close()
            self._file = self._open()

    def finish(self, flows: list[Flow], summary: Summary) -> str:
        text = line(summary_record(flows, summary, self.run))
        if self._file is None:
            return text  # with the other outputs' text, in the run's one final write
        self._write(text)
        self._file.close()
        return ""


PLUGIN = Plugin(
    name="json",
    kind="output",
    description="JSON Lines: a record per new flow as it is seen and a summary at the end (schema flow-v1.json)",
    factory=JsonLinesOutput,
    options=(
        Option(
            "file",
            "append the records to FILE instead of stdout; SIGHUP reopens it (for logrotate)",
            "",
            valid="a path",
        ),
    ),
    example="-o json -O json:file:/var/log/egress-auditor/flows.jsonl",
)
