"""Secrets in command lines become *** before they reach any output: each
form on its own, inside a shell string, the rest of the line kept; parents
too; a redacted capture still rebuilds the same rules; and --raw-cmdlines
keeps them (trace's own wiring is tested against the kernel in
tests/kernel/test_service_trace.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from flowdata import START, conn, proc
from hypothesis import given
from hypothesis import strategies as st

from egress_auditor.attribution.redact import redact_cmdline, redact_process
from egress_auditor.capture.reader import read_captures
from egress_auditor.display.live import PlainLog
from egress_auditor.inputs import InputBase
from egress_auditor.plugins import select
from egress_auditor.rules.rule import rules_from_flows
from egress_auditor.trace import TraceRun

CONSOLE = Path(sys.executable).with_name("egress-auditor")
SECRET = "S3cretPassw0rd"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # a user:password after -u / --user (curl, wget's --user takes the user alone)
        (["curl", "-u", f"admin:{SECRET}", "http://h/"], ["curl", "-u", "admin:***", "http://h/"]),
        (["curl", "--user", f"admin:{SECRET}", "http://h/"], ["curl", "--user", "admin:***", "http://h/"]),
        (["curl", f"--user=admin:{SECRET}"], ["curl", "--user=admin:***"]),
        (["curl", f"-uadmin:{SECRET}"], ["curl", "-uadmin:***"]),
        (["curl", "-u", "admin", "http://h/"], ["curl", "-u", "admin", "http://h/"]),  # no password given
        # values of -p / --password / --passwd
        (["mysql", "-p", SECRET, "db"], ["mysql", "-p", "***", "db"]),
        (["mysql", f"-p{SECRET}", "db"], ["mysql", "-p***", "db"]),
        (["svn", "--password", SECRET, "up"], ["svn", "--password", "***", "up"]),
        (["svn", f"--password={SECRET}", "up"], ["svn", "--password=***", "up"]),
        (["x", "--passwd", SECRET], ["x", "--passwd", "***"]),
        (["x", f"--passwd={SECRET}"], ["x", "--passwd=***"]),
        # token= secret= key= password= values, wherever they are in an argument
        ([f"https://api/v1?token={SECRET}&page=2"], ["https://api/v1?token=***&page=2"]),
        ([f"https://api/?access_token={SECRET}"], ["https://api/?access_token=***"]),
        ([f"client_secret={SECRET}"], ["client_secret=***"]),
        ([f"https://maps/?key={SECRET}&q=x"], ["https://maps/?key=***&q=x"]),
        ([f"API_KEY={SECRET}", "run"], ["API_KEY=***", "run"]),
        ([f"password={SECRET};user=bob"], ["password=***;user=bob"]),
        # credentials in URLs
        ([f"https://admin:{SECRET}@example.org/x"], ["https://admin:***@example.org/x"]),
        ([f"postgres://app:{SECRET}@db:5432/prod"], ["postgres://app:***@db:5432/prod"]),
        (["git", "clone", f"https://bob:{SECRET}@git.host/r.git"], ["git", "clone", "https://bob:***@git.host/r.git"]),
        # Authorization and Cookie headers
        (["curl", "-H", f"Authorization: Bearer {SECRET}", "u"], ["curl", "-H", "Authorization: ***", "u"]),
        (["curl", "-H", f"authorization:Basic {SECRET}"], ["curl", "-H", "authorization:***"]),
        (["curl", "-H", f"Proxy-Authorization: Basic {SECRET}"], ["curl", "-H", "Proxy-Authorization: ***"]),
        (["curl", "--header", f"Cookie: session={SECRET}; theme=dark"], ["curl", "--header", "Cookie: ***"]),
    ],
)
def test_each_form_is_masked_and_the_rest_kept(argv: list[str], expected: list[str]) -> None:
    assert list(redact_cmdline(tuple(argv))) == expected


def test_forms_inside_one_shell_string() -> None:
    line = (
        f"curl -u admin:{SECRET} -H 'Authorization: Bearer {SECRET}' "
        f"'https://bob:{SECRET}@h/?token={SECRET}' && mysql -p {SECRET} db"
    )
    got = redact_cmdline(("sh", "-c", line))
    assert SECRET not in " ".join(got)
    assert got == (
        "sh",
        "-c",
        "curl -u admin:*** -H 'Authorization: ***' 'https://bob:***@h/?token=***' && mysql -p *** db",
    )


def test_lines_without_secrets_are_unchanged() -> None:
    for argv in (
        ("curl", "-sS", "https://example.org/path?q=1"),
        ("ssh", "-o", "BatchMode=yes", "alice@host"),
        ("python3", "-m", "http.server", "8080"),
        ("wget", "-q", "http://[fd00::1]:8080/"),
        (),
    ):
        assert redact_cmdline(argv) == argv


@given(st.lists(st.text(max_size=40), max_size=6))
def test_redaction_is_idempotent_and_keeps_the_argument_count(argv: list[str]) -> None:
    once = redact_cmdline(tuple(argv))
    assert len(once) == len(argv)
    assert redact_cmdline(once) == once


def test_parents_are_redacted_and_clean_processes_kept_as_they_are() -> None:
    parent = proc(10, "sh", 0, "root", ["sh", "-c", f"curl -u a:{SECRET} http://h/"])
    child = proc(11, "curl", 0, "root", ["curl", "-u", f"a:{SECRET}", "http://h/"], parent=parent)
    got = redact_process(child)
    assert got.cmdline == ("curl", "-u", "a:***", "http://h/")
    assert got.parent is not None and SECRET not in got.parent.command_line
    clean = proc(12, "curl", 0, "root", ["curl", "http://h/"], parent=proc(1, "init", 0, "root", ["/sbin/init"]))
    assert redact_process(clean) is clean


class OneShot(InputBase):
    """An input that hands over the given connections at its first poll (stands in for the kernel)."""

    name = "scripted"

    def __init__(self, connections: list) -> None:
        self.connections = connections

    def open(self) -> str:
        return "scripted"

    def poll(self, _timeout: float, emit) -> None:  # type: ignore[no-untyped-def]
        for c in self.connections:
            emit(c)
        self.connections = []

    def sync(self, *_: object) -> None:
        pass

    def stats(self):  # type: ignore[no-untyped-def]
        from egress_auditor.inputs import InputStats

        return InputStats()

    def close(self) -> None:
        pass


class Known:
    """An attributor that knows every process already (the connection carries it)."""

    lineage = None

    def attribute(self, c):  # type: ignore[no-untyped-def]
        return c.process


def trace_with_secrets(tmp_path: Path, redact: bool) -> tuple[str, Path]:
    parent = proc(40, "sh", 0, "root", ["sh", "-c", f"curl -u admin:{SECRET} http://h/"])
    curl = proc(41, "curl", 0, "root", ["curl", "-u", f"admin:{SECRET}", "http://10.0.0.1/"], parent=parent)
    wget = proc(42, "wget", 0, "root", ["wget", f"http://u:{SECRET}@10.0.0.2/?token={SECRET}"])
    connections = [conn(curl, "10.0.0.1", 80, START), conn(wget, "10.0.0.2", 443, START + 1)]
    path = tmp_path / f"flows-{redact}.jsonl"
    outputs = select(
        "output",
        ["json", "iptables"],
        [f"json:file:{path}", "iptables:verbose:2", f"iptables:dir:{tmp_path / str(redact)}"],
        default="iptables",
    ).create()
    stdout, stderr = io.StringIO(), io.StringIO()
    run = TraceRun(
        inputs=[OneShot(connections)],
        outputs=outputs,
        display=PlainLog(stderr),
        count=2,
        stdout=stdout,
        stderr=stderr,
        redact=redact,
        attributor=Known(),  # type: ignore[arg-type]
    )
    assert run.run() == 0
    return stdout.getvalue() + stderr.getvalue(), path


def test_a_trace_writes_no_secret_anywhere_and_raw_cmdlines_keeps_them(tmp_path: Path) -> None:
    text, capture = trace_with_secrets(tmp_path, redact=True)
    written = [text, capture.read_text(), (tmp_path / "True" / "rules.v4").read_text()]
    assert "curl -u admin:*** http://10.0.0.1/" in written[0]  # verbose 2: the command line, masked
    assert all(SECRET not in w for w in written)
    assert all(r["process"]["cmdline"] for r in map(json.loads, capture.read_text().splitlines()) if "process" in r)
    raw_text, raw_capture = trace_with_secrets(tmp_path, redact=False)
    assert SECRET in raw_text and SECRET in raw_capture.read_text()


def test_a_redacted_capture_rebuilds_the_same_rules(tmp_path: Path) -> None:
    text, capture = trace_with_secrets(tmp_path, redact=True)
    _, raw_capture = trace_with_secrets(tmp_path, redact=False)
    redacted, raw = read_captures([str(capture)]), read_captures([str(raw_capture)], redact=False)

    def allowed(flows: list) -> list[tuple]:
        return [
            (r.protocol, r.family, r.dst, r.dport, r.connections, r.first_seen, r.last_seen)
            for r in rules_from_flows(flows)
        ]

    assert allowed(redacted.flows) == allowed(raw.flows) and len(allowed(raw.flows)) == 2
    rebuilt = subprocess.run(
        [str(CONSOLE), "rules", "--from", str(capture), "-O", "iptables:verbose:2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr

    def statements(t: str) -> list[str]:
        return [line for line in t.splitlines() if line.startswith("iptables ")]

    assert statements(rebuilt.stdout) == statements(text) and len(statements(text)) == 2
    # The same command lines as the trace wrote them, masked.
    assert [line for line in rebuilt.stdout.splitlines() if "command line" in line] == [
        line for line in text.splitlines() if "command line" in line
    ]


def test_rules_from_a_raw_capture_masks_unless_asked(tmp_path: Path) -> None:
    _, raw_capture = trace_with_secrets(tmp_path, redact=False)
    for extra, leaks in (((), False), (("--raw-cmdlines",), True)):
        out = subprocess.run(
            [str(CONSOLE), "rules", "--from", str(raw_capture), "-O", "iptables:verbose:2", *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert (SECRET in out.stdout) is leaks
        assert "admin:***" in out.stdout or leaks
