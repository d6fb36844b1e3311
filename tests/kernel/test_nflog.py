"""The nflog input for real: NFLOG rules in a client namespace (the user's own,
or installed by setup through iptables or nft), real clients, a real server
across a veth pair, the auditor itself run inside the namespace."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from netfilter_run import (
    EGRESS_AUDITOR,
    HOLDING_CLIENT,
    NOBODY,
    UDP_BURST,
    Auditor,
    curl,
    flow_line,
    nft_tables,
    start_auditor,
    summary_numbers,
    tagged_iptables,
)
from netns import Link, Namespace, http_server

PORT = 18090


@pytest.fixture
def served(net: Link) -> Iterator[Link]:
    with http_server(net.b, PORT):
        yield net


def start(auditors: list[Auditor], ns: Namespace, *args: str) -> Auditor:
    return start_auditor(auditors, ns, "nflog", *args)


def test_the_go_tools_way_a_users_rule_and_a_group(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    for binary in ("iptables", "ip6tables"):
        ns.run([binary, "-I", "OUTPUT", "-m", "state", "--state", "NEW", "-p", "tcp", "-j", "NFLOG",
                "--nflog-group", "100"])  # fmt: skip
    auditor = start(auditors, ns, "-I", "nflog:group:100")
    assert curl(ns, f"http://{served.b4}:{PORT}/", *NOBODY) == 0
    assert curl(ns, f"http://[{served.b6}]:{PORT}/") == 0
    v4 = auditor.wait_line(flow_line(served.b4, PORT))
    v6 = auditor.wait_line(flow_line(served.b6, PORT))
    assert v4.endswith("user nobody)"), v4  # the uid NFLOG gave with the packet
    assert v6.endswith("user root)"), v6
    assert auditor.stop() == 0
    assert re.search(rf"(?m)^iptables -I OUTPUT \d+ -d {served.b4}/32 -p tcp -m tcp --dport {PORT} ", auditor.stdout)
    assert re.search(rf"(?m)^ip6tables -I OUTPUT \d+ -d {served.b6}/128 -p tcp -m tcp --dport {PORT} ", auditor.stdout)
    assert "setup:none, rules are yours" in auditor.attach_line
    # setup:none leaves the user's rules as they were
    assert "NFLOG --nflog-group 100" in ns.run(["iptables", "-S", "OUTPUT"]).stdout
    assert summary_numbers(auditor.stderr)[2] == 0


def test_setup_auto_installs_tagged_rules_and_sigterm_removes_them(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    auditor = start(auditors, ns, "-I", "nflog:setup:auto", "-I", "nflog:group:7")
    rules = tagged_iptables(ns)
    assert len(rules) == 4, rules  # TCP SYN and UDP, IPv4 and IPv6
    assert all(f"pid={auditor.proc.pid} " in r and "--nflog-group 7" in r for r in rules), rules
    assert sum("--tcp-flags FIN,SYN,RST,ACK SYN" in r for r in rules) == 2, rules
    assert sum("-p udp" in r for r in rules) == 2, rules
    assert "rules in iptables/ip6tables mangle OUTPUT (NFLOG group 7)" in auditor.attach_line
    assert curl(ns, f"http://[{served.b6}]:{PORT}/") == 0
    ns.run([sys.executable, "-c", "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
            f".sendto(b'q', ('{served.b4}', 5353))"])  # fmt: skip
    auditor.wait_line(flow_line(served.b6, PORT))
    auditor.wait_line(flow_line(served.b4, 5353, "UDP"))
    assert auditor.stop(signal.SIGTERM) == 0
    assert tagged_iptables(ns) == []
    assert re.search(rf"(?m)^iptables -I OUTPUT \d+ -d {served.b4}/32 -p udp -m udp --dport 5353 ", auditor.stdout)


def test_setup_nft_uses_a_table_of_its_own_and_removes_it(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    auditor = start(auditors, ns, "-I", "nflog:setup:nft")
    tables = nft_tables(ns)
    assert tables == [f"table inet egress_auditor_nflog_{auditor.proc.pid}_" + tables[0].rsplit("_", 1)[1]], tables
    ruleset = ns.run(["nft", "list", "ruleset"]).stdout
    assert ruleset.count("log group 100") == 2 and f'comment "egress-auditor nflog pid={auditor.proc.pid} ' in ruleset
    assert tagged_iptables(ns) == []
    assert curl(ns, f"http://{served.b4}:{PORT}/") == 0
    auditor.wait_line(flow_line(served.b4, PORT))
    assert auditor.stop(signal.SIGINT) == 0
    assert nft_tables(ns) == []


def test_auto_follows_a_host_that_writes_nft_itself(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    ns.run(["nft", "add", "table", "inet", "filter"])
    ns.run(["nft", "add", "chain", "inet", "filter", "output", "{ type filter hook output priority 0; }"])
    auditor = start(auditors, ns, "-I", "nflog:setup:auto")
    assert "rules in nft table inet egress_auditor_nflog_" in auditor.attach_line, auditor.stderr
    assert tagged_iptables(ns) == []
    assert curl(ns, f"http://{served.b4}:{PORT}/") == 0
    auditor.wait_line(flow_line(served.b4, PORT))
    assert auditor.stop() == 0
    assert nft_tables(ns) == []
    assert "table inet filter" in ns.run(["nft", "list", "tables"]).stdout  # the host's own table stays


def test_a_killed_runs_rules_are_removed_by_the_next_run(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    killed = start(auditors, ns, "-I", "nflog:setup:auto")
    killed.kill()
    left = tagged_iptables(ns)
    assert len(left) == 4 and all(f"pid={killed.proc.pid} " in r for r in left), left
    nextrun = start(auditors, ns, "-I", "nflog:setup:auto")
    assert f"removed 4 rule(s) left by killed run(s) (pid {killed.proc.pid})" in nextrun.attach_line, nextrun.stderr
    now = tagged_iptables(ns)
    assert len(now) == 4 and all(f"pid={nextrun.proc.pid} " in r for r in now), now
    assert nextrun.stop() == 0
    assert tagged_iptables(ns) == []


def test_messages_lost_to_a_small_buffer_are_counted(client_ns: Namespace, auditors: list[Auditor]) -> None:
    burst = 3000
    auditor = start(auditors, client_ns, "-I", "nflog:setup:auto", "-I", "nflog:rcvbuf:1")
    client_ns.run([sys.executable, "-c", UDP_BURST, "127.0.0.1", "20000", str(burst)])
    auditor.wait_line(flow_line("127.0.0.1", 20000 + burst, "UDP"))  # the last datagram, sent after a pause
    assert auditor.stop() == 0
    _flows, connections, lost = summary_numbers(auditor.stderr)
    assert lost > 0, auditor.stderr
    # Every message is numbered: what arrived and what was counted lost add up to what was sent.
    assert connections + lost == burst + 1, (connections, lost)
    assert f"events lost: {lost}" in auditor.stdout


def test_the_process_is_found_through_its_socket(served: Link, auditors: list[Auditor]) -> None:
    ns = served.a
    auditor = start(auditors, ns, "-I", "nflog:setup:auto", "-O", "iptables:verbose:1")
    client = ns.popen([*NOBODY, sys.executable, "-c", HOLDING_CLIENT, served.b4, str(PORT), "1.5"])
    line = auditor.wait_line(flow_line(served.b4, PORT))
    assert client.wait(timeout=20) == 0
    assert re.search(rf"by python3 \(pid {client.pid}, user nobody\)$", line), (line, client.pid)
    assert auditor.stop() == 0
    assert f"#   python3 (pid {client.pid}) running as nobody, attribution socket" in auditor.stdout, auditor.stdout


def test_a_bound_group_is_refused_with_one_line(client_ns: Namespace, auditors: list[Auditor]) -> None:
    first = start(auditors, client_ns, "-I", "nflog:group:9")
    second = client_ns.run([str(EGRESS_AUDITOR), "trace", "-i", "nflog", "-I", "nflog:group:9",
                            "-I", "nflog:setup:auto"], check=False)  # fmt: skip
    assert second.returncode == 1
    assert "NFLOG group 9 is already bound by another program" in second.stderr
    assert tagged_iptables(client_ns) == []  # refused before any rule went in
    assert first.stop() == 0


def test_rules_are_never_put_in_the_machines_own_namespace() -> None:
    """The tests above ran the auditor in namespaces of their own: the machine's own mangle table has no tag."""
    own = subprocess.run(["iptables", "-t", "mangle", "-S"], capture_output=True, text=True, check=True).stdout
    assert "egress-auditor nflog" not in own
