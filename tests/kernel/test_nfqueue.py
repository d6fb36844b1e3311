"""The nfqueue input for real: an auditor, never a gate. Real NFQUEUE rules in a
client namespace, real connections across a veth pair; the auditor killed with
SIGKILL in the middle of a stream of connections, and every one succeeds."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator

import pytest
from netfilter_run import (
    EGRESS_AUDITOR,
    NOBODY,
    Auditor,
    curl,
    flow_line,
    nft_tables,
    start_auditor,
    stream,
    stream_result,
    summary_numbers,
    tagged_iptables,
)
from netns import Link, Namespace, http_server

PORT = 18091


@pytest.fixture
def served(net: Link) -> Iterator[Link]:
    with http_server(net.b, PORT):
        yield net


def start(auditors: list[Auditor], ns: Namespace, *args: str) -> Auditor:
    return start_auditor(auditors, ns, "nfqueue", *args)


def queued_packets(ns: Namespace) -> int:
    """Packets that went through our NFQUEUE rules (iptables counters, IPv4 and IPv6)."""
    total = 0
    for binary in ("iptables", "ip6tables"):
        for line in ns.run([binary, "-t", "mangle", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout.splitlines():
            if "NFQUEUE" in line:
                total += int(line.split()[0])
    return total


def test_new_connections_are_seen_and_accepted(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    auditor = start(auditors, ns, "-I", "nfqueue:setup:auto", "-I", "nfqueue:queue:5")
    rules = tagged_iptables(ns)
    assert len(rules) == 4, rules
    assert all("-j NFQUEUE --queue-num 5 --queue-bypass" in r for r in rules), rules
    assert "fail-open, every packet accepted" in auditor.attach_line
    assert curl(ns, f"http://{served.b4}:{PORT}/", *NOBODY) == 0
    assert curl(ns, f"http://[{served.b6}]:{PORT}/") == 0
    assert auditor.wait_line(flow_line(served.b4, PORT)).endswith("user nobody)")  # NFQA_UID
    assert auditor.wait_line(flow_line(served.b6, PORT)).endswith("user root)")
    assert queued_packets(ns) == 2  # only each connection's SYN was queued
    assert auditor.stop() == 0
    assert tagged_iptables(ns) == []
    assert re.search(rf"(?m)^ip6tables -I OUTPUT \d+ -d {served.b6}/128 -p tcp -m tcp --dport {PORT} ", auditor.stdout)
    assert summary_numbers(auditor.stderr)[1:] == (2, 0)


def test_sigkill_during_a_stream_of_connections_loses_none(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    auditor = start(auditors, ns, "-I", "nfqueue:setup:auto")
    count = 400
    client = stream(ns, served.b4, PORT, count, 0.005)
    auditor.wait_line(flow_line(served.b4, PORT))  # the queue is in the path: the auditor saw the stream
    time.sleep(0.3)
    auditor.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    auditor.proc.wait(timeout=10)
    result = stream_result(client)
    assert time.monotonic() - killed_at > 0.5, "the stream ended before the kill: make it longer"
    assert result == {"ok": count, "failed": 0, "slowest": result["slowest"]}, result
    # The rules outlived the auditor (no clean-up after SIGKILL): connections kept going
    # through them because of --queue-bypass, and every SYN passed the queue rule.
    assert len(tagged_iptables(ns)) == 4
    assert queued_packets(ns) >= count
    nextrun = start(auditors, ns, "-I", "nfqueue:setup:auto")
    assert f"(pid {auditor.proc.pid})" in nextrun.attach_line, nextrun.stderr
    assert nextrun.stop() == 0
    assert tagged_iptables(ns) == []


def test_an_unbound_queue_lets_traffic_through(served: Link) -> None:
    """What SIGKILL leaves behind, shown on its own: a bypass rule with nobody reading the queue."""
    ns = served.a
    ns.run(["iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--syn", "-j", "NFQUEUE",
            "--queue-num", "11", "--queue-bypass"])  # fmt: skip
    assert curl(ns, f"http://{served.b4}:{PORT}/") == 0
    assert queued_packets(ns) == 1


def test_a_users_own_queue_rule(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    ns.run(["ip6tables", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--syn", "-j", "NFQUEUE",
            "--queue-num", "7", "--queue-bypass"])  # fmt: skip
    auditor = start(auditors, ns, "-I", "nfqueue:queue:7")
    assert "setup:none, rules are yours" in auditor.attach_line
    assert curl(ns, f"http://[{served.b6}]:{PORT}/") == 0
    auditor.wait_line(flow_line(served.b6, PORT))
    assert auditor.stop() == 0
    assert "--queue-num 7" in ns.run(["ip6tables", "-t", "mangle", "-S"]).stdout  # left as the user made it


def test_auto_on_a_host_that_writes_nft(served: Link, auditors: list[Auditor]) -> None:
    """nft when the kernel has its queue statement; else iptables (nft_compat), saying why."""
    ns = served.a
    ns.run(["nft", "add", "table", "inet", "filter"])
    auditor = start(auditors, ns, "-I", "nfqueue:setup:auto")
    attached = auditor.attach_line
    if "nft table" in attached:
        assert len(nft_tables(ns)) == 1 and "queue num 100 bypass" in ns.run(["nft", "list", "ruleset"]).stdout
    else:
        assert "iptables/ip6tables mangle OUTPUT" in attached and "(nft: " in attached, attached
        assert len(tagged_iptables(ns)) == 4
    assert curl(ns, f"http://{served.b4}:{PORT}/") == 0
    auditor.wait_line(flow_line(served.b4, PORT))
    assert auditor.stop() == 0
    assert nft_tables(ns) == [] and tagged_iptables(ns) == []


def test_a_bound_queue_is_refused_and_the_first_keeps_working(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    first = start(auditors, ns, "-I", "nfqueue:setup:auto")
    second = ns.run([str(EGRESS_AUDITOR), "trace", "-i", "nfqueue", "-I", "nfqueue:setup:auto"], check=False)
    assert second.returncode == 1
    assert "NFQUEUE queue 100 is already bound by another program" in second.stderr
    assert all(f"pid={first.proc.pid} " in r for r in tagged_iptables(ns))
    assert curl(ns, f"http://{served.b4}:{PORT}/") == 0
    first.wait_line(flow_line(served.b4, PORT))
    assert first.stop() == 0


def test_a_stream_counts_each_connection_once_and_loses_none(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    auditor = start(auditors, ns, "-I", "nfqueue:setup:auto")
    result = stream_result(stream(ns, served.b4, PORT, 200, 0.0))
    assert result["failed"] == 0
    deadline = time.monotonic() + 10
    while queued_packets(ns) < 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert auditor.stop() == 0
    _flows, connections, lost = summary_numbers(auditor.stderr)
    assert (connections, lost) == (200, 0), auditor.stderr
