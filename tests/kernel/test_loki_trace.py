"""`egress-auditor trace` with Loki away: the real tracer still prints every
rule at the end, on time, and says what it could not push; with a local Loki
the same records arrive as the json output writes them."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from netns import Link
from unit.test_loki import FakeLoki, free_port

from kernel.test_nftables_netns import SEEN, curl, servers  # noqa: F401

CONSOLE = Path(sys.executable).with_name("egress-auditor")
RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"


def start(argv: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """The tracer, once it says it is running; its stderr lines are collected as they come."""
    tracer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    running = threading.Event()

    def read() -> None:
        assert tracer.stderr is not None
        for line in tracer.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith(RUNNING_LINE):
                running.set()

    threading.Thread(target=read, daemon=True).start()
    assert running.wait(60), lines
    return tracer, lines


def finish(tracer: subprocess.Popen) -> str:
    assert tracer.stdout is not None
    stdout = tracer.stdout.read()
    tracer.wait(timeout=60)
    time.sleep(0.2)  # the stderr reader takes the last lines
    return stdout


def test_absent_loki_never_loses_the_rules(servers: Link) -> None:  # noqa: F811
    net = servers
    url = f"http://127.0.0.1:{free_port()}"
    argv = [str(CONSOLE), "trace", "--no-live", "-t", "4", "-o", "iptables", "-o", "loki", "-O", f"loki:url:{url}"]
    tracer, stderr = start([*argv, "-O", "loki:flush_timeout:1"])
    assert curl(net.a, net.b4, SEEN) == 0
    began = time.monotonic()
    stdout = finish(tracer)
    assert tracer.returncode == 0, stderr
    assert time.monotonic() - began < 15  # the end waited flush_timeout for Loki, not for ever
    assert stdout.startswith("#!/bin/sh\n")
    assert f"-d {net.b4}/32 -p tcp -m tcp --dport {SEEN} " in stdout
    report = [line for line in stderr if line.startswith(f"egress-auditor: loki {url}")]
    assert len(report) == 1 and "unsent at exit" in report[0] and "pushed 0 record(s)" in report[0]


def test_local_loki_receives_flows_and_summary(servers: Link) -> None:  # noqa: F811
    net = servers
    loki = FakeLoki()
    try:
        argv = [str(CONSOLE), "trace", "--no-live", "-t", "4", "-o", "loki", "-O", f"loki:url:{loki.url}"]
        tracer, stderr = start([*argv, "-O", "loki:batch_wait:0.2"])
        assert curl(net.a, net.b6, SEEN) == 0
        stdout = finish(tracer)
        assert tracer.returncode == 0, stderr
        assert stdout == ""  # the loki output writes nothing to stdout
        assert loki.invalid == []
        records = loki.lines()
        assert records[-1]["type"] == "summary"
        seen = [r for r in records if r["type"] == "flow" and (r["dst"], r["dport"]) == (net.b6, SEEN)]
        assert len(seen) == 1 and seen[0]["process"]["name"] == "curl"
    finally:
        loki.stop()
