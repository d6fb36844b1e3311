"""Drift against a baseline with real commands and real connections: a
known connection exits 0, a new one 3 (with a drift line, a drift record and
rules for it alone), a failing command its own status, and a baseline that
is not a capture a one-line error with status 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from netns import Link, http_server

EGRESS_AUDITOR = Path(sys.executable).with_name("egress-auditor")
KNOWN, NEW = 18390, 18391


def trace(net: Link, *args: str, script: str) -> subprocess.CompletedProcess:
    """`trace --no-live ARGS -- sh -c SCRIPT` in the client namespace (nsenter keeps cgroup v2 visible)."""
    argv = ["nsenter", f"--net=/run/netns/{net.a.name}", str(EGRESS_AUDITOR), "trace", "--no-live", *args,
            "--", "sh", "-c", script]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def curl(net: Link, port: int) -> str:
    return f"curl -sS -o /dev/null --max-time 5 http://{net.b4}:{port}/"


@pytest.fixture
def served(net: Link) -> Link:
    with http_server(net.b, KNOWN), http_server(net.b, NEW):
        yield net


def test_drift_exit_codes_lines_records_and_rules(served: Link, tmp_path: Path) -> None:
    net = served
    base = tmp_path / "base.jsonl"
    made = trace(net, "-o", "json", "-O", f"json:file:{base}", script=curl(net, KNOWN))
    assert made.returncode == 0, made.stderr

    known = trace(net, "--baseline", str(base), script=curl(net, KNOWN))
    assert known.returncode == 0, known.stderr
    assert not any(line.startswith("drift:") for line in known.stderr.splitlines()), known.stderr
    assert "0 drifted from the baseline" in known.stderr
    assert "--dport" not in known.stdout and "# drift: 0 of 1 flows not covered" in known.stdout

    records = tmp_path / "drift.jsonl"
    drifted = trace(net, "--baseline", str(base), "-o", "iptables", "-o", "json", "-O", f"json:file:{records}",
                    script=f"{curl(net, KNOWN)} && {curl(net, NEW)}")  # fmt: skip
    assert drifted.returncode == 3, drifted.stderr
    lines = [line for line in drifted.stderr.splitlines() if line.startswith("drift:")]
    assert len(lines) == 1 and re.search(rf"-> {re.escape(net.b4)}:{NEW} by curl \(pid \d+", lines[0]), lines
    statements = [line for line in drifted.stdout.splitlines() if not line.startswith("#")]
    assert len(statements) == 1 and f"--dport {NEW} " in statements[0], drifted.stdout
    kinds = [json.loads(line)["type"] for line in records.read_text().splitlines()]
    assert kinds == ["flow", "flow", "drift", "summary"], kinds
    drift = json.loads(records.read_text().splitlines()[2])
    assert (drift["dst"], drift["dport"], drift["comm"]) == (net.b4, NEW, "curl")

    failing = trace(net, "--baseline", str(base), script=f"{curl(net, NEW)}; exit 7")
    assert failing.returncode == 7, failing.stderr
    assert any(line.startswith("drift:") for line in failing.stderr.splitlines())

    # The capture with drift records in it reads back as a baseline: both destinations are known now.
    both = trace(net, "--baseline", str(base), "--baseline", str(records),
                 script=f"{curl(net, KNOWN)} && {curl(net, NEW)}")  # fmt: skip
    assert both.returncode == 0, both.stderr


def test_a_baseline_that_is_not_a_capture(served: Link, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": "world"}\n')
    done = trace(served, "--baseline", str(bad), script="true")
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and f"{bad}:1: record version None" in done.stderr, done.stderr
    assert done.stdout == ""
