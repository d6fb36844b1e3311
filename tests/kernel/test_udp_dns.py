"""UDP destinations and DNS names through the real eBPF programs: real
clients (Python sockets, getent, curl) in a client namespace, real servers
(dnsmasq, a UDP echo server, a hostile DNS server) in a server namespace."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.name
import pytest
from dnsserver import RAW_QUERY, dnsmasq, hostile_dns, resolv_conf
from netns import Link, http_server

from egress_auditor.attribution.enrich import DnsNaming
from egress_auditor.capture.flows import FlowTable
from egress_auditor.escape import rule_comment, terminal_text
from egress_auditor.host import facts
from egress_auditor.inputs.ebpf import PLUGIN, EbpfInput
from egress_auditor.model import Connection, FlowKey, Transport

HTTP_PORT = 18090
ECHO_PORT = 5301
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

# Sends datagrams as the spec says and prints its pid: unconnected sendto
# (repeated), connected send, and a connect that never sends (as glibc does
# to sort addresses).
UDP_CLIENT = r"""
import json, os, socket, sys
spec = json.loads(sys.argv[1])
family = socket.AF_INET6 if ":" in spec["host"] else socket.AF_INET
for port in spec.get("sendto", []):
    s = socket.socket(family, socket.SOCK_DGRAM)
    for _ in range(spec.get("connections", 1)):
        s.sendto(b"x", (spec["host"], port))
    s.close()
for port in spec.get("connected", []):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect((spec["host"], port))
    s.send(b"y")
    s.close()
for port in spec.get("silent", []):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect((spec["host"], port))
    s.close()
print(json.dumps({"pid": os.getpid()}))
"""

# Echoes each datagram back to its sender from an unconnected socket.
ECHO_SERVER = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""


class Collector:
    """Connections from an input, kernel counts folded in and named, as the trace run does."""

    def __init__(self, source: EbpfInput) -> None:
        self.source = source
        self.table = FlowTable()
        self.events: list[Connection] = []
        self.naming = DnsNaming(source.names)

    def _take(self, received: Connection) -> None:
        conn = self.naming.enrich(received)
        assert conn is not None
        self.events.append(conn)
        self.table.add(conn)

    def settle(self, until: Callable[[], bool] = lambda: False, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.source.poll(0.05, self._take)
            if until():
                break
        self.source.poll(0, self._take)
        self.source.sync(self._take, self.table.add_kernel_count)

    def to(self, dst: str, dport: int | None = None, protocol: Transport | None = None) -> list[Connection]:
        address = ipaddress.ip_address(dst)
        return [
            c
            for c in self.events
            if c.dst == address and (dport is None or c.dport == dport) and (protocol is None or c.protocol is protocol)
        ]

    def count(self, conn: Connection) -> int:
        flow = self.table.get(FlowKey(conn.protocol, conn.family, conn.dst, conn.dport, conn.uid, conn.comm))
        assert flow is not None
        return flow.connections


def without_send_tracepoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on kernels before 6.3: first sends of connected UDP sockets are seen at cgroup_skb egress."""
    exists, absent = facts.tracepoint_exists, ("sock", "sock_send_length")
    monkeypatch.setattr(facts, "tracepoint_exists", lambda c, e: (c, e) != absent and exists(c, e))


@pytest.fixture(params=["send-tracepoint", "egress"])
def collector(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    if request.param == "egress":
        without_send_tracepoint(monkeypatch)
    source = EbpfInput(PLUGIN.defaults() | {"dns": "on"})
    described = source.open()
    assert "UDP: cgroup" in described and "DNS answers" in described, described
    assert ("sock_send_length" in described) is (request.param == "send-tracepoint"), described
    try:
        yield Collector(source)
    finally:
        source.close()


def udp_client(net: Link, spec: dict) -> int:
    result = net.a.run([sys.executable, "-c", UDP_CLIENT, json.dumps(spec)])
    return json.loads(result.stdout)["pid"]


@pytest.mark.parametrize("side", ["b4", "b6"])
def test_unconnected_and_connected_udp_are_flows_counted_in_the_kernel(
    net: Link, collector: Collector, side: str
) -> None:
    host = getattr(net, side)
    pid = udp_client(net, {"host": host, "sendto": [5201], "connections": 25, "connected": [5202], "silent": [5203]})
    collector.settle(lambda: len(collector.to(host, 5202)) >= 1)
    sent = collector.to(host, 5201, Transport.UDP)
    assert len(sent) == 1, "repeats of a flow cross to user space once"
    # The kernel's comm is the name the client was started by (python3, or python in a venv).
    assert sent[0].pid == pid and sent[0].comm == Path(sys.executable).name[:15]
    assert collector.count(sent[0]) == 25
    connected = collector.to(host, 5202, Transport.UDP)
    assert [c.pid for c in connected] == [pid]
    # A UDP connect that never sends (glibc's address sorting) is no flow.
    assert collector.to(host, 5203) == []


# Sockets that connect and close without sending (glibc sorting addresses), then
# sends from fresh sockets, which the kernel may place where the closed ones were.
REUSE_CLIENT = r"""
import socket, sys, time
host, silent, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(200):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, silent + i))
    s.close()
    time.sleep(0.02)  # UDP sockets are freed after an RCU grace period: then their memory is reused
    t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    t.sendto(b"z", (host, target))
    t.close()
"""


def test_a_closed_silent_socket_leaves_nothing_for_the_next_one(net: Link, collector: Collector) -> None:
    net.a.run([sys.executable, "-c", REUSE_CLIENT, net.b4, "6000", "7000"])
    collector.settle(lambda: len(collector.to(net.b4, 7000)) >= 1)
    found = collector.to(net.b4, protocol=Transport.UDP)
    assert [c.dport for c in found] == [7000], sorted({c.dport for c in found})[:10]
    assert collector.count(found[0]) == 200


# A connected socket that first sends elsewhere with an explicit address, then to its peer.
SENDTO_THEN_SEND = r"""
import socket, sys
host = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, 7101))
s.sendto(b"a", (host, 7102))
s.send(b"b")
s.close()
"""


def test_a_connected_socket_keeps_its_peer_through_a_sendto_elsewhere(net: Link, collector: Collector) -> None:
    """The send hook forgets pending connects only for unconnected sockets."""
    net.a.run([sys.executable, "-c", SENDTO_THEN_SEND, net.b4])
    collector.settle(lambda: len(collector.to(net.b4, 7101)) >= 1)
    assert sorted(c.dport for c in collector.to(net.b4, protocol=Transport.UDP)) == [7101, 7102]


def test_an_ipv4_mapped_udp_destination_is_ipv4(net: Link, collector: Collector) -> None:
    udp_client(net, {"host": f"::ffff:{net.b4}", "sendto": [5211], "connected": [5212]})
    collector.settle(lambda: len(collector.to(net.b4, 5212)) >= 1)
    for port in (5211, 5212):
        found = collector.to(net.b4, port, Transport.UDP)
        assert len(found) == 1 and found[0].family.label == "IPv4"


@pytest.mark.parametrize("dns", ["auto", "off"], ids=["dns-on", "dns-off"])
def test_a_udp_servers_replies_are_not_flows(net: Link, dns: str) -> None:
    """Peers are learned where the server reads them (recvmsg hooks), with or without the DNS program."""
    source = EbpfInput(PLUGIN.defaults() | {"dns": dns})
    assert ("DNS answers" in source.open()) is (dns == "auto")
    collector = Collector(source)
    server = net.b.popen([sys.executable, "-c", ECHO_SERVER, net.b4, str(ECHO_PORT)])
    try:
        ask = (
            f"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
            f"for _ in range(50):\n"
            f"    s.sendto(b'ping', ('{net.b4}', {ECHO_PORT}))\n"
            f"    try:\n        s.recvfrom(100); break\n    except TimeoutError: pass\n"
        )
        net.a.run([sys.executable, "-c", ask])
        collector.settle(lambda: len(collector.to(net.b4, ECHO_PORT)) >= 1)
        assert len(collector.to(net.b4, ECHO_PORT, Transport.UDP)) == 1
        # The echo back to the client's port comes from the server: a reply, not a destination.
        assert collector.to(net.a4, protocol=Transport.UDP) == []
    finally:
        server.kill()
        server.wait()
        source.close()


def test_dns_names_from_dnsmasq_over_ipv4_and_ipv6(net: Link, collector: Collector) -> None:
    records = [f"--host-record=svc.example.test,{net.b4},{net.b6}", "--cname=alias.example.test,svc.example.test"]
    with dnsmasq(net.b, [net.b4, net.b6], records), http_server(net.b, HTTP_PORT):
        with resolv_conf(net.a, [net.b4]):
            resolved = net.a.run(["getent", "ahostsv4", "svc.example.test"]).stdout
            assert net.b4 in resolved
            net.a.run(["curl", "-4", "-sS", "-o", "/dev/null", f"http://alias.example.test:{HTTP_PORT}/"])
        with resolv_conf(net.a, [net.b6]):
            net.a.run(["curl", "-6", "-sS", "-o", "/dev/null", f"http://svc.example.test:{HTTP_PORT}/"])
        collector.settle(lambda: len(collector.to(net.b6, HTTP_PORT)) >= 1)
    # The resolver traffic itself: UDP to port 53 over IPv4 and IPv6.
    assert collector.to(net.b4, 53, Transport.UDP) and collector.to(net.b6, 53, Transport.UDP)
    over_v4 = collector.to(net.b4, HTTP_PORT, Transport.TCP)
    assert [c.hostname for c in over_v4] == ["alias.example.test"], "the CNAME is followed to the name asked for"
    over_v6 = collector.to(net.b6, HTTP_PORT, Transport.TCP)
    assert [c.hostname for c in over_v6] == ["svc.example.test"]


def test_dns_over_tcp_and_names_kept_per_process(net: Link, collector: Collector) -> None:
    records = [f"--host-record=one.example.test,{net.b4}", f"--host-record=two.example.test,{net.b4}"]
    # Each process asks its own name for the same address (one over TCP), then connects.
    client = (
        "import ctypes, dns.message, dns.query, socket, sys\n"
        "name, server, port, tcp, comm = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == 'tcp',"
        " sys.argv[5]\n"
        "ctypes.CDLL(None).prctl(15, comm.encode(), 0, 0, 0)  # PR_SET_NAME: its own flow\n"
        "query = dns.message.make_query(name, 'A')\n"
        "answer = (dns.query.tcp if tcp else dns.query.udp)(query, server, timeout=3)\n"
        "address = answer.answer[0][0].address\n"
        "socket.create_connection((address, port), timeout=3).close()\n"
    )
    asks = (("one.example.test", "tcp", "resolver-one"), ("two.example.test", "udp", "resolver-two"))
    with dnsmasq(net.b, [net.b4], records), http_server(net.b, HTTP_PORT):
        for name, transport, comm in asks:
            net.a.run([sys.executable, "-c", client, name, net.b4, str(HTTP_PORT), transport, comm])
        collector.settle(lambda: len(collector.to(net.b4, HTTP_PORT)) >= 2)
    names = {c.comm: c.hostname for c in collector.to(net.b4, HTTP_PORT, Transport.TCP)}
    assert names == {"resolver-one": "one.example.test", "resolver-two": "two.example.test"}


def trace(args: list[str], during: Callable[[], None]) -> subprocess.CompletedProcess:
    """`egress-auditor trace` as a subprocess; `during` runs once it says it is running."""
    exe = str(Path(sys.executable).with_name("egress-auditor"))
    proc = subprocess.Popen(
        [exe, "trace", "--no-live", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "is running" in line:
            break
    during()
    proc.send_signal(2)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + err)


def test_a_hostile_dns_name_reaches_rules_and_terminal_escaped(net: Link) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="ea"))  # short: a DNS label holds 63 bytes
    marker = workdir / "P"
    labels = [f'x";touch {marker};"', f"\n$(touch {marker})\x1b]0;pwn\x07`id`", "[bold]y[/]"]
    hostile = dns.name.Name([label.encode("latin-1") for label in labels] + [b"test", b""])
    client = (
        "import socket, subprocess, sys\n"
        "address = subprocess.run([sys.executable, '-c', sys.argv[1], 'svc.asked.test', sys.argv[2]],"
        " capture_output=True, text=True, check=True).stdout.strip()\n"
        "socket.create_connection((address, int(sys.argv[3])), timeout=3).close()\n"
    )

    def connect() -> None:
        net.a.run([sys.executable, "-c", client, RAW_QUERY, net.b4, str(HTTP_PORT)])
        time.sleep(1.5)  # one sync of kernel counts

    try:
        with hostile_dns(net.b, net.b4, net.b4, net.b6, labels), http_server(net.b, HTTP_PORT):
            result = trace(["-I", "ebpf:dns:on", "-O", "iptables:verbose:2"], connect)
        assert result.returncode == 0, result.stderr
        rule = [line for line in result.stdout.splitlines() if f"--dport {HTTP_PORT} " in line and net.b4 in line]
        assert len(rule) == 1
        named = hostile.to_text(omit_final_dot=True)
        assert f'--comment "{rule_comment("python3 " + named)}"' in rule[0]
        assert "%22" in rule[0] and "$(" not in rule[0]
        for text in (result.stdout, result.stderr):
            assert not CONTROL.search(text.replace("\n", ""))
        # The terminal line names the destination's name too, escaped: no control characters, no markup run.
        assert terminal_text(named) in result.stderr
        # The rules run for real in the client namespace: nothing injected, one rule per flow.
        script = workdir / "rules.sh"
        script.write_text(result.stdout)
        net.a.run(["sh", str(script)])
        assert not marker.exists()
        listed = net.a.run(["iptables", "-S", "OUTPUT"]).stdout
        assert sum(f"--dport {HTTP_PORT} " in line for line in listed.splitlines()) == 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_udp_rules_allow_what_was_seen_and_block_the_rest(net: Link, tmp_path: Path) -> None:
    servers = [net.b.popen([sys.executable, "-c", ECHO_SERVER, net.b4, str(port)]) for port in (5311, 5312)]
    ping = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)\n"
        "for _ in range(20):\n"
        "    try:\n"
        "        s.sendto(b'ping', (sys.argv[1], int(sys.argv[2]))); s.recvfrom(100); sys.exit(0)\n"
        "    except PermissionError: sys.exit(3)\n"
        "    except TimeoutError: pass\n"
        "sys.exit(4)\n"
    )
    try:
        result = trace(
            ["-O", "iptables:format:restore", "-O", "iptables:policy:drop"],
            lambda: (net.a.run([sys.executable, "-c", ping, net.b4, "5311"]), time.sleep(1.5)),
        )
        assert f"-A OUTPUT -d {net.b4}/32 -p udp -m udp --dport 5311 " in result.stdout
        rules = tmp_path / "rules.v4"
        rules.write_text(result.stdout)
        net.a.run(["iptables-restore", "--test", str(rules)])
        net.a.run(["iptables-restore", str(rules)])
        assert net.a.run([sys.executable, "-c", ping, net.b4, "5311"], check=False).returncode == 0
        assert net.a.run([sys.executable, "-c", ping, net.b4, "5312"], check=False).returncode == 3
    finally:
        for server in servers:
            server.kill()
            server.wait()


def test_the_syscall_path_sees_udp_where_cgroup_hooks_are_not_used(net: Link) -> None:
    source = EbpfInput({**PLUGIN.defaults(), "udp": "syscalls", "dns": "off"})
    assert "UDP: syscall tracepoints" in source.open()
    try:
        collector = Collector(source)
        pid = udp_client(net, {"host": net.b4, "sendto": [5221], "connections": 5, "connected": [5222]})
        collector.settle(lambda: len(collector.to(net.b4, 5222)) >= 1)
        sent = collector.to(net.b4, 5221, Transport.UDP)
        assert [c.pid for c in sent] == [pid] and collector.count(sent[0]) == 5
        assert [c.pid for c in collector.to(net.b4, 5222, Transport.UDP)] == [pid]
        # A TCP connect on this path is still only TCP.
        net.a.run(["curl", "-s", "-o", "/dev/null", "--max-time", "2", f"http://{net.b4}:9/"], check=False)
        collector.settle(lambda: len(collector.to(net.b4, 9)) >= 1)
        assert {c.protocol for c in collector.to(net.b4, 9)} == {Transport.TCP}
    finally:
        source.close()


CGROUP_PROGRAM_NAMES = (
    *("connect4", "connect6", "udp_sendmsg4", "udp_sendmsg6", "udp_recvmsg4", "udp_recvmsg6"),
    "ingress",  # and udp_egress before 6.3 (no sock_send_length tracepoint)
)


def attached_to_root() -> list[str]:
    """Programs attached to the cgroup v2 root, as bpftool lists them (ids dropped)."""
    root = str(facts.cgroup2_root())
    listing = subprocess.run(["bpftool", "cgroup", "show", root], capture_output=True, text=True, check=True).stdout
    return sorted(" ".join(line.split()[1:]) for line in listing.splitlines()[1:] if line.strip())


def test_no_cgroup_program_outlives_the_input() -> None:
    """Links detach on close: the root cgroup ends as it began."""
    before = attached_to_root()
    source = EbpfInput(PLUGIN.defaults() | {"dns": "on"})
    source.open()
    links = list(source.cgroup.links)
    # connect4/6 (TCP and UDP), sendmsg4/6 and recvmsg4/6 (UDP), ingress (DNS).
    assert len(links) == len(CGROUP_PROGRAM_NAMES), "each cgroup hook through a BPF link"
    during = attached_to_root()
    assert len(during) == len(before) + len(links)
    for name in CGROUP_PROGRAM_NAMES:
        assert any(line.split()[-1] == name for line in during), (name, during)
    source.close()
    for fd in links:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert attached_to_root() == before


def test_a_killed_auditor_leaves_nothing_attached() -> None:
    """SIGKILL gives no chance to clean up: the kernel drops the links with the process."""
    before = attached_to_root()
    opener = (
        "from egress_auditor.inputs.ebpf import PLUGIN, EbpfInput\n"
        "source = EbpfInput(PLUGIN.defaults() | {'dns': 'on'}); source.open(); print('open', flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", opener], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        assert len(attached_to_root()) == len(before) + len(CGROUP_PROGRAM_NAMES)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while attached_to_root() != before and time.monotonic() < deadline:
        time.sleep(0.1)  # the links go when the last reference to them is dropped
    assert attached_to_root() == before


def test_names_through_a_local_stub_resolver(net: Link, collector: Collector) -> None:
    """As with systemd-resolved: the client asks 127.0.0.53, which asks upstream."""
    records = [f"--host-record=stub.example.test,{net.b4}"]
    stub = [
        "--server=" + net.b4,
        "--listen-address=127.0.0.53",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--keep-in-foreground",
        "--user=root",
        "--pid-file=",
        "--log-facility=/dev/null",
    ]
    with dnsmasq(net.b, [net.b4], records), http_server(net.b, HTTP_PORT):
        resolver = net.a.popen(["dnsmasq", *stub], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with resolv_conf(net.a, ["127.0.0.53"]):
                net.a.run(
                    [
                        "curl",
                        "-sS",
                        "-o",
                        "/dev/null",
                        "--retry",
                        "3",
                        "--retry-connrefused",
                        f"http://stub.example.test:{HTTP_PORT}/",
                    ]
                )
            collector.settle(lambda: len(collector.to(net.b4, HTTP_PORT)) >= 1)
        finally:
            resolver.kill()
            resolver.wait()
    assert [c.comm for c in collector.to("127.0.0.53", 53, Transport.UDP)] == ["curl"]
    assert [c.hostname for c in collector.to(net.b4, HTTP_PORT, Transport.TCP)] == ["stub.example.test"]
