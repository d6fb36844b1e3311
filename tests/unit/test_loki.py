"""The loki output against a local HTTP server (loopback only) that checks each
push as Loki's API documents it: POST /loki/api/v1/push, JSON (here gzipped),
streams of label sets with [nanoseconds as a string, line] values in time
order, label names of [a-zA-Z_][a-zA-Z0-9_]* not starting with __, tenant and
basic auth headers; it answers 204, or 429/503 when told to, or is absent."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
from flowdata import START, conn, proc, sample_connections, summary

from egress_auditor.capture.flows import FlowTable
from egress_auditor.capture.records import schema
from egress_auditor.errors import UsageError
from egress_auditor.model import Connection
from egress_auditor.outputs.loki import LokiOutput
from egress_auditor.plugins import select

CUT = -1  # an answer FakeLoki breaks off
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
VALIDATOR = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())


class FakeLoki(ThreadingHTTPServer):
    """Records valid pushes; a request that breaks Loki's rules is answered 400 and kept in `invalid`."""

    daemon_threads = True

    def __init__(self, port: int = 0, tenant: str = "", auth: str = "") -> None:
        self.tenant, self.auth = tenant, auth
        self.answers: list[tuple[int, dict[str, str]]] = []  # given out first, then 204
        self.delay = 0.0
        self.entries: list[tuple[dict[str, str], str, str]] = []
        self.requests: list[int] = []  # status answered, in order
        self.batch_sizes: list[int] = []  # bytes of the lines in each accepted push
        self.invalid: list[str] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), PushHandler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def lines(self) -> list[dict]:
        with self.lock:
            return [json.loads(line) for _, _, line in self.entries]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class PushHandler(BaseHTTPRequestHandler):
    server: FakeLoki

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        server = self.server
        time.sleep(server.delay)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        problem = self.problem(body)
        with server.lock:
            if problem:
                server.invalid.append(problem)
                status, headers = 400, {}
            elif server.answers:
                status, headers = server.answers.pop(0)
            else:
                status, headers = 204, {}
                streams = json.loads(gzip.decompress(body))["streams"]
                for stream in streams:
                    server.entries.extend((stream["stream"], ts, line) for ts, line in stream["values"])
                server.batch_sizes.append(sum(len(line) for st in streams for _, line in st["values"]))
            server.requests.append(status)
        if status == CUT:  # a proxy that hangs up half way through its answer
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
            self.close_connection = True
            return
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def problem(self, body: bytes) -> str:
        if self.path != "/loki/api/v1/push":
            return f"path {self.path}"
        if self.headers.get("Content-Type") != "application/json":
            return f"content type {self.headers.get('Content-Type')}"
        if self.headers.get("Content-Encoding") != "gzip":
            return "not gzip"
        if self.server.tenant and self.headers.get("X-Scope-OrgID") != self.server.tenant:
            return f"tenant {self.headers.get('X-Scope-OrgID')}"
        if self.server.auth and self.headers.get("Authorization") != self.server.auth:
            return f"authorization {self.headers.get('Authorization')}"
        try:
            push = json.loads(gzip.decompress(body))
        except (OSError, ValueError) as exc:
            return f"body: {exc}"
        if set(push) != {"streams"} or not push["streams"]:
            return "no streams"
        for stream in push["streams"]:
            labels, values = stream["stream"], stream["values"]
            if not labels or not all(LABEL_NAME.match(k) and not k.startswith("__") for k in labels):
                return f"label names {list(labels)}"
            if not all(isinstance(v, str) for v in labels.values()):
                return "label values must be strings"
            stamps = []
            for value in values:
                if len(value) != 2 or not all(isinstance(x, str) for x in value) or not value[0].isdigit():
                    return f"value {value!r}: [nanoseconds as a string, line]"
                stamps.append(int(value[0]))
            if stamps != sorted(stamps):
                return "entries of a stream out of order"
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def loki() -> Iterator[FakeLoki]:
    server = FakeLoki()
    yield server
    server.stop()


def make(url: str, *options: str, stderr: io.StringIO | None = None) -> LokiOutput:
    chosen = select("output", ["loki"], [f"loki:url:{url}", *options], default="loki").chosen["loki"]
    return LokiOutput(chosen, stderr=stderr or io.StringIO())


def feed(output: LokiOutput, connections: list[Connection]) -> FlowTable:
    table = FlowTable()
    for c in connections:
        flow, is_new = table.add(c)
        output.connection(c, flow, is_new)
    return table


def wait_for(condition, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def many(n: int) -> list[Connection]:
    return [conn(proc(1000 + i, f"worker{i}", 1000, "alice"), "192.0.2.10", 1024 + i, START + i) for i in range(n)]


def test_every_flow_and_the_summary_arrive_with_few_labels(loki: FakeLoki) -> None:
    loki.tenant = "team-a"
    stderr = io.StringIO()
    output = make(loki.url, "loki:tenant:team-a", "loki:labels:env=prod,dc=x1", stderr=stderr)
    connections = sample_connections()
    table = feed(output, connections + connections)
    assert output.finish(list(table), summary(connections)) == ""
    assert loki.invalid == []
    records = loki.lines()
    for record in records:
        VALIDATOR.validate(record)
    assert sorted(r["type"] for r in records) == ["flow"] * len(table) + ["summary"]
    label_sets = {tuple(sorted(labels.items())) for labels, _, _ in loki.entries}
    names = {name for labels in label_sets for name, _ in labels}
    assert names == {"job", "host", "kind", "input", "protocol", "env", "dc"}
    assert len(label_sets) <= 3  # tcp flows, udp flows, the summary: no process or address in a label
    flow_labels, ts, _ = next(e for e in loki.entries if json.loads(e[2])["dst"] == "203.0.113.5")
    assert flow_labels["protocol"] == "udp" and flow_labels["env"] == "prod" and flow_labels["job"] == "egress-auditor"
    assert ts == str(int((START + 3) * 1_000_000) * 1000)
    assert re.fullmatch(r"egress-auditor: loki \S+: pushed 12 record\(s\) in \d+ request\(s\)\n", stderr.getvalue())


def test_basic_auth_from_a_password_file(loki: FakeLoki, tmp_path: Path) -> None:
    secret = tmp_path / "loki.pw"
    secret.write_text("s3cret:x\n")
    loki.auth = "Basic " + base64.b64encode(b"alice:s3cret:x").decode()
    output = make(loki.url, "loki:user:alice", f"loki:password_file:{secret}")
    output.finish(list(feed(output, many(3))), summary([]))
    assert loki.invalid == [] and len(loki.lines()) == 4


def test_batched_by_size(loki: FakeLoki) -> None:
    output = make(loki.url, "loki:batch_bytes:4000", "loki:batch_wait:60")
    connections = many(40)
    feed(output, connections)
    # Full batches leave long before the wait is over, and before the end of the run.
    wait_for(lambda: len(loki.lines()) >= 30, 10)
    assert len(loki.requests) >= 4
    assert all(size <= 4000 for size in loki.batch_sizes)
    output.finish([], summary([]))
    assert len(loki.lines()) == 41 and loki.invalid == []


def test_batched_by_time(loki: FakeLoki) -> None:
    output = make(loki.url, "loki:batch_wait:0.2")
    feed(output, many(3))
    began = time.monotonic()
    wait_for(lambda: len(loki.lines()) == 3, 5)  # a small batch goes out once it is 0.2s old
    assert time.monotonic() - began < 2
    assert loki.requests == [204]
    output.finish([], summary([]))


def test_429_and_5xx_are_retried_and_nothing_is_sent_twice(loki: FakeLoki) -> None:
    loki.answers = [(429, {"Retry-After": "0"}), (503, {}), (500, {})]
    stderr = io.StringIO()
    output = make(loki.url, "loki:batch_wait:0.05", stderr=stderr)
    table = feed(output, many(10))
    output.finish(list(table), summary([]))
    assert loki.requests[:3] == [429, 503, 500] and loki.requests[-1] == 204
    records = loki.lines()
    assert len(records) == 11
    assert len({(r.get("dport"), r["type"]) for r in records}) == 11  # each once
    assert output.retries == 3 and "3 retried" in stderr.getvalue()


def test_an_answer_cut_short_is_retried(loki: FakeLoki) -> None:
    loki.answers = [(CUT, {})]
    output = make(loki.url, "loki:batch_wait:0.05")
    output.finish(list(feed(output, many(2))), summary([]))
    assert loki.requests == [CUT, 204] and output.retries == 1
    assert len(loki.lines()) == 3


def test_an_outage_is_ridden_out(tmp_path: Path) -> None:
    port = free_port()
    output = make(f"http://127.0.0.1:{port}", "loki:batch_wait:0.05", "loki:flush_timeout:20")
    feed(output, many(5))
    wait_for(lambda: output.retries >= 2, 10)  # connection refused, retried with backoff
    server = FakeLoki(port)  # Loki comes back on the same address
    try:
        output.finish([], summary([]))
        assert len(server.lines()) == 6 and server.invalid == []
        assert output.unsent == 0 and output.dropped == 0
    finally:
        server.stop()


def test_an_absent_loki_never_slows_tracing_or_blocks_the_end() -> None:
    stderr = io.StringIO()
    output = make(f"http://127.0.0.1:{free_port()}", "loki:flush_timeout:0.5", "loki:buffer:100", stderr=stderr)
    connections = many(300)
    began = time.monotonic()
    table = feed(output, connections)
    assert time.monotonic() - began < 0.5  # only a queue append per record
    began = time.monotonic()
    output.finish(list(table), summary(connections))
    assert time.monotonic() - began < 2.0  # flush_timeout, not forever
    assert output.dropped == 200 and output.pushed == 0
    assert output.unsent == 101  # the buffer and the summary, which is never dropped
    report = stderr.getvalue()
    assert "200 dropped (buffer of 100 full)" in report and "101 unsent at exit (URLError" in report


def test_a_slow_loki_never_slows_tracing(loki: FakeLoki) -> None:
    loki.delay = 1.0
    output = make(loki.url, "loki:batch_wait:0.01", "loki:flush_timeout:10")
    began = time.monotonic()
    table = feed(output, many(200))
    assert time.monotonic() - began < 0.5
    output.finish(list(table), summary([]))
    assert len(loki.lines()) == 201  # everything arrived in the end
    assert len(loki.requests) < 10  # what queued during a slow push went in the next batch


def test_a_rejected_batch_is_counted_not_retried(loki: FakeLoki) -> None:
    loki.answers = [(400, {})]
    stderr = io.StringIO()
    output = make(loki.url, "loki:batch_wait:0.05", stderr=stderr)
    feed(output, many(2))
    wait_for(lambda: loki.requests[:1] == [400], 5)
    output.finish([], summary([]))
    assert output.rejected == 2 and output.retries == 0
    assert "2 rejected (HTTP 400)" in stderr.getvalue()
    assert [r["type"] for r in loki.lines()] == ["summary"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ((), "needs -O loki:url:URL"),
        (("loki:url:ftp://x",), "expected an http:// or https:// URL"),
        (("loki:url:http://x", "loki:labels:__name__=x"), "label names of letters"),
        (("loki:url:http://x", "loki:labels:1a=x"), "label names of letters"),
        (("loki:url:http://x", "loki:labels:env"), "label names of letters"),
        (("loki:url:http://x", "loki:user:alice"), "needs -O loki:password_file:PATH"),
        (("loki:url:http://x", "loki:user:a", "loki:password_file:/nonexistent"), "cannot read loki:password_file"),
        (("loki:url:http://x", "loki:batch_wait:0"), "a positive number of seconds"),
        (("loki:url:http://x", "loki:buffer:-1"), "a positive whole number"),
    ],
)
def test_bad_options_are_usage_errors(options: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        select("output", ["loki"], list(options), default="loki").create()


def test_push_url_from_a_base_url() -> None:
    chosen = select("output", ["loki"], ["loki:url:https://logs.example:3100/"], default="loki").chosen["loki"]
    assert chosen["url"] == "https://logs.example:3100/loki/api/v1/push"
    full = select("output", ["loki"], ["loki:url:http://gw/loki/api/v1/push"], default="loki").chosen["loki"]
    assert full["url"] == "http://gw/loki/api/v1/push"
