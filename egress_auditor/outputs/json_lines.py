"""JSON Lines output: a `flow` record per new flow as it is seen, a
`checkpoint` record at each snapshot, a `summary` record at the end
(records.py; schema in egress_auditor/capture/schema/flow-v1.json).

To stdout, or appended to a file that is reopened on SIGHUP so logrotate can
move it away. A record reaches the file whole or not at all: a write that
fails (a full disk) is cut back off, so the file stays a capture.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import uuid
from typing import Any, TextIO

from egress_auditor.capture.records import drift_record, flow_record, line, summary_record
from egress_auditor.errors import UsageError
from egress_auditor.model import Connection, Flow, Summary
from egress_auditor.outputs import OutputBase
from egress_auditor.plugins import Option, Plugin

# A count folded from the kernel carries the time of its connect, at most a sync interval (10 s) before
# the fold: a checkpoint lists every flow seen up to this long before the newest the last one held.
CHECKPOINT_MARGIN_S = 60.0
TAIL_MAX = 1 << 20  # a record is far shorter: a longer last line is not ours to repair


class JsonLinesOutput(OutputBase):
    name = "json"
    per_run = True  # each run records its own part; readers (rules --from, --resume) merge runs

    def __init__(self, options: dict[str, Any], stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.path: str = options["file"]
        self.run = uuid.uuid4().hex[:16]
        self.host = socket.gethostname()
        self._stdout = stdout or sys.stdout
        self._stderr = stderr or sys.stderr
        self._checkpointed = (0, 0, 0, 0)  # flows, connections, lost, map full at the last checkpoint
        # The newest last_seen of any flow at the last checkpoint in this file; None: the next lists every flow.
        self._checkpoint_mark: float | None = None
        try:
            self._fd: int | None = self._open() if self.path else None
        except OSError as exc:
            raise UsageError(f"cannot open json:file {self.path!r}: {exc.strerror}") from None

    def _open(self) -> int:
        # Append: a file rotated away and one that is kept across runs both stay whole.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                self._end_last_line(fd)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _end_last_line(self, fd: int) -> None:
        """A run killed in the middle of a write left a line without its end: records appended
        after it would join it. A whole record gets its newline; a fragment is cut off."""
        size = os.fstat(fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as reader:
            reader.seek(max(0, size - TAIL_MAX))
            tail = reader.read(min(size, TAIL_MAX))
        if tail.endswith(b"\n"):
            return
        start = tail.rfind(b"\n") + 1
        if start == 0 and size > TAIL_MAX:
            raise OSError(0, "its last line is not a record (no newline in the last MB)")
        fragment = tail[start:]
        try:
            json.loads(fragment)
        except ValueError:
            os.ftruncate(fd, size - len(fragment))
            print(
                f"egress-auditor: json:file {self.path}: removed a last line cut short "
                f"({len(fragment)} bytes, an interrupted write)",
                file=self._stderr,
            )
        else:
            os.write(fd, b"\n")

    def _write(self, text: str) -> None:
        if self._fd is None:
            self._stdout.write(text)
            self._stdout.flush()
            return
        data = text.encode("ascii")
        size = os.fstat(self._fd).st_size
        try:
            written = 0
            while written < len(data):  # one record, whole: readers never see half a line
                written += os.write(self._fd, data[written:])
        except OSError:
            try:
                os.ftruncate(self._fd, size)  # what was written before this record stays as it was
            except OSError:
                pass
            raise

    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None:
        if is_new:
            self._write(line(flow_record(conn, self.run, self.host)))

    def drift(self, conn: Connection, flow: Flow) -> None:
        self._write(line(drift_record(conn, self.run, self.host)))

    def reopen(self) -> None:
        """SIGHUP: close the file and open the path again (a new file after rotation)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._fd = self._open()
            self._checkpoint_mark = None  # a rotated file starts over: its first checkpoint lists every flow

    def snapshot(self, flows: list[Flow], summary: Summary) -> None:
        """A checkpoint: the counts as of now of every flow seen since the last checkpoint in this file
        (every flow in the first), so a run stopped hard can be resumed from here. Skipped while nothing
        was seen since the last one (that one still holds): a quiet night adds nothing."""
        seen = (len(flows), summary.connections, summary.events_lost, summary.map_full)
        if self._fd is None or seen == self._checkpointed:
            return
        since = None if self._checkpoint_mark is None else self._checkpoint_mark - CHECKPOINT_MARGIN_S
        self._write(line(summary_record(flows, summary, self.run, kind="checkpoint", totals_since=since)))
        self._checkpointed = seen
        if flows:
            self._checkpoint_mark = max(f.last_seen for f in flows)

    def finish(self, flows: list[Flow], summary: Summary) -> str:
        text = line(summary_record(flows, summary, self.run))
        if self._fd is None:
            return text  # with the other outputs' text, in the run's one final write
        try:
            self._write(text)
        finally:
            os.close(self._fd)
            self._fd = None
        return ""


PLUGIN = Plugin(
    name="json",
    kind="output",
    description="JSON Lines: a record per new flow as it is seen and a summary at the end (schema flow-v1.json)",
    factory=JsonLinesOutput,
    options=(
        Option(
            "file",
            "append the records to FILE instead of stdout (a checkpoint record at each snapshot); "
            "SIGHUP reopens it (for logrotate)",
            "",
            valid="a path",
        ),
    ),
    example="-o json -O json:file:/var/log/egress-auditor/flows.jsonl",
)
