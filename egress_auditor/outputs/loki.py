"""Grafana Loki output: the json output's records pushed to /loki/api/v1/push.

A background thread sends; the trace only appends to a bounded buffer, so a
slow or absent Loki never slows tracing. Batches go out when they reach a
size or an age, gzipped, and are retried with backoff on 429, 5xx and
connection errors. Drops (buffer full) and what was left unsent at exit are
counted and reported. Labels stay few (job, host, input, protocol, kind);
process, destination and names are in the line.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from egress_auditor.capture.records import drift_record, flow_record, summary_record
from egress_auditor.errors import UsageError
from egress_auditor.model import Connection, Flow, Summary
from egress_auditor.outputs import OutputBase
from egress_auditor.plugins import Option, Plugin, positive_int

PUSH_PATH = "/loki/api/v1/push"
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # Prometheus label names, as Loki takes them
BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 10.0
RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Entry:
    labels: Labels
    ns: int  # nanoseconds since the epoch
    line: str

    @property
    def size(self) -> int:
        return len(self.line) + 32


def push_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL of Loki, e.g. http://loki:3100")
    return text if parts.path.endswith(PUSH_PATH) else text.rstrip("/") + PUSH_PATH


def static_labels(text: str) -> Labels:
    labels = []
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise ValueError("name=value,... with names of letters, digits and _ (not starting with a digit or __)")
        labels.append((name, value))
    return tuple(labels)


def seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("a positive number of seconds")
    return value


def payload(entries: list[Entry]) -> bytes:
    """The push body Loki documents: streams of [nanoseconds as a string, line], each in time order."""
    streams: dict[Labels, list[Entry]] = {}
    for entry in entries:
        streams.setdefault(entry.labels, []).append(entry)
    body = {
        "streams": [
            {"stream": dict(labels), "values": [[str(e.ns), e.line] for e in sorted(group, key=lambda e: e.ns)]}
            for labels, group in streams.items()
        ]
    }
    return gzip.compress(json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode("ascii"))


class LokiOutput(OutputBase):
    name = "loki"
    per_run = True  # records of this run only, as the json output writes them

    def __init__(self, options: dict[str, Any], stderr: TextIO | None = None) -> None:
        if not options["url"]:
            raise UsageError("the loki output needs -O loki:url:URL (e.g. http://loki:3100)")
        self.url: str = options["url"]
        self.batch_bytes: int = options["batch_bytes"]
        self.batch_wait: float = options["batch_wait"]
        self.buffer: int = options["buffer"]
        self.timeout: float = options["timeout"]
        self.flush_timeout: float = options["flush_timeout"]
        self.headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        if options["tenant"]:
            self.headers["X-Scope-OrgID"] = options["tenant"]
        if options["user"]:
            password = self._password(options["password_file"])
            token = base64.b64encode(f"{options['user']}:{password}".encode()).decode("ascii")
            self.headers["Authorization"] = f"Basic {token}"
        self.host = socket.gethostname()
        self.static: Labels = (("job", "egress-auditor"), *options["labels"])
        self.run = uuid.uuid4().hex[:16]
        self._stderr = stderr or sys.stderr
        self._entries: deque[Entry] = deque()
        self._bytes = 0
        self._oldest: float | None = None
        self._wake = threading.Condition()
        self._closing = False
        self._deadline = float("inf")  # monotonic time after which nothing more is tried
        self.pushed = self.requests = self.dropped = self.retries = self.rejected = self.unsent = 0
        self.last_error = ""
        self._thread = threading.Thread(target=self._send_loop, name="loki-push", daemon=True)
        self._thread.start()

    @staticmethod
    def _password(path: str) -> str:
        if not path:
            raise UsageError("loki:user needs -O loki:password_file:PATH (a file holding the password)")
        try:
            return Path(path).read_text().rstrip("\n")
        except OSError as exc:
            raise UsageError(f"cannot read loki:password_file {path!r}: {exc.strerror}") from None

    def _labels(self, kind: str, conn: Connection | None) -> Labels:
        own = {"host": self.host, "kind": kind}
        if conn is not None:
            own |= {"input": conn.input, "protocol": conn.protocol.name.lower()}
        # Static labels given with -O win over ours: the user named them on purpose.
        merged = dict(own) | dict(self.static)
        return tuple(sorted(merged.items()))

    def _enqueue(self, entry: Entry, always: bool = False) -> None:
        with self._wake:
            if len(self._entries) >= self.buffer and not always:
                self.dropped += 1
                return
            if not self._entries:
                self._oldest = time.monotonic()  # a batch waits from when its first record was queued
            self._entries.append(entry)
            self._bytes += entry.size
            if self._bytes >= self.batch_bytes:
                self._wake.notify()

    # -- the output interface --------------------------------------------------
    def connection(self, conn: Connection, flow: Flow, is_new: bool) -> None:
        if is_new:
            line = json.dumps(flow_record(conn, self.run, self.host), ensure_ascii=True, separators=(",", ":"))
            self._enqueue(Entry(self._labels("flow", conn), int(conn.time * 1_000_000) * 1000, line))

    def drift(self, conn: Connection, flow: Flow) -> None:
        line = json.dumps(drift_record(conn, self.run, self.host), ensure_ascii=True, separators=(",", ":"))
        self._enqueue(Entry(self._labels("drift", conn), int(conn.time * 1_000_000) * 1000, line))

    def finish(self, flows: list[Flow], summary: Summary) -> str:
        record = summary_record(flows, summary, self.run)
        line = json.dumps(record, ensure_ascii=True, separators=(",", ":"))
        # The summary carries every flow's totals: it is never dropped for a full buffer.
        self._enqueue(Entry(self._labels("summary", None), int(summary.ended * 1_000_000) * 1000, line), always=True)
        with self._wake:
            self._closing = True
            self._deadline = time.monotonic() + self.flush_timeout
            self._wake.notify()
        self._thread.join(self.flush_timeout + 1.0)
        with self._wake:
            self.unsent += len(self._entries)
            self._entries.clear()
        self._report()
        return ""

    def _report(self) -> None:
        parts = [f"pushed {self.pushed} record(s) in {self.requests} request(s)"]
        if self.retries:
            parts.append(f"{self.retries} retried")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (buffer of {self.buffer} full)")
        if self.rejected:
            parts.append(f"{self.rejected} rejected ({self.last_error})")
        if self.unsent:
            parts.append(f"{self.unsent} unsent at exit ({self.last_error or 'Loki too slow'})")
        print(f"egress-auditor: loki {self.url}: {', '.join(parts)}", file=self._stderr, flush=True)

    # -- the sending thread ----------------------------------------------------
    def _ready(self) -> bool:
        if not self._entries:
            return False
        waited = time.monotonic() - (self._oldest or 0.0)
        return self._closing or self._bytes >= self.batch_bytes or waited >= self.batch_wait

    def _take(self) -> list[Entry]:
        batch: list[Entry] = []
        size = 0
        while self._entries and (not batch or size + self._entries[0].size <= self.batch_bytes):
            entry = self._entries.popleft()
            size += entry.size
            batch.append(entry)
        self._bytes -= size
        self._oldest = time.monotonic() if self._entries else None
        return batch

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while not self._ready():
                    if self._closing and not self._entries:
                        return
                    self._wake.wait(self.batch_wait / 4)
                batch = self._take()
            if not self._send(batch):
                with self._wake:  # the exit deadline passed: what is left is reported as unsent
                    self.unsent += len(batch) + len(self._entries)
                    self._entries.clear()
                return

    def _send(self, batch: list[Entry]) -> bool:
        """Push one batch, retrying; False once the exit deadline has passed."""
        body = payload(batch)
        delay = BACKOFF_MIN_S
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                return False
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(request, timeout=min(self.timeout, remaining)) as response:
                    response.read()
                self.requests += 1
                self.pushed += len(batch)
                return True
            except urllib.error.HTTPError as exc:
                self.requests += 1
                message = exc.read(200).decode("utf-8", "replace").strip()
                self.last_error = f"HTTP {exc.code}" + (f": {message}" if message else "")
                if exc.code not in RETRY_STATUS:
                    self.rejected += len(batch)  # Loki said this batch is wrong: sending it again cannot help
                    return True
                retry_after = exc.headers.get("Retry-After")
            except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, reset, cut short, DNS
                self.last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            self.retries += 1
            wait = delay * random.uniform(0.5, 1.0)
            if retry_after and retry_after.isdigit():
                wait = max(wait, float(retry_after))
            with self._wake:
                self._wake.wait(min(wait, BACKOFF_MAX_S, max(0.0, self._deadline - time.monotonic())))
            delay = min(delay * 2, BACKOFF_MAX_S)


PLUGIN = Plugin(
    name="loki",
    kind="output",
    description="Grafana Loki: the json records pushed to /loki/api/v1/push, gzipped batches, a background thread",
    factory=LokiOutput,
    options=(
        Option("url", "Loki's base URL (or the full push URL)", "", convert=lambda v: push_url(v) if v else "",
               valid="an http:// or https:// URL"),
        Option("tenant", "X-Scope-OrgID header, for a multi-tenant Loki", ""),
        Option("user", "basic auth user (with password_file)", ""),
        Option("password_file", "file holding the basic auth password (kept off the command line)", ""),
        Option("labels", "extra static labels: name=value,name=value", "", convert=static_labels,
               valid="name=value,... with label names of letters, digits and _"),
        Option("batch_bytes", "send a batch when it holds this many bytes", "1048576", convert=positive_int,
               valid="a positive whole number"),
        Option("batch_wait", "send a batch at most this many seconds after its first record", "1", convert=seconds,
               valid="a positive number of seconds"),
        Option("buffer", "records held while Loki is slow or away; more are dropped and counted", "10000",
               convert=positive_int, valid="a positive whole number"),
        Option("timeout", "seconds one push may take", "5", convert=seconds, valid="a positive number of seconds"),
        Option("flush_timeout", "seconds the end of a run waits for Loki before reporting what is unsent", "5",
               convert=seconds, valid="a positive number of seconds"),
    ),
    example="-o loki -O loki:url:http://loki:3100 -O loki:labels:env=prod",
)  # fmt: skip
