"""DNS servers for tests, each run inside a test namespace: dnsmasq (Debian's
dnsmasq-base) for honest answers, and a small dnspython server whose answers
are as hostile as a real attacker's (names are echoed from the question)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from netns import Namespace, wait_for_port

# Answers every A/AAAA question with the given addresses, but under a hostile
# question name of its own: the question section of an answer is written by the
# server, and a sniffer (unlike glibc) does not check it against the query.
HOSTILE_SERVER = r"""
import socket, sys
import dns.message, dns.rdataclass, dns.rdatatype, dns.rrset, dns.name
bind, v4, v6 = sys.argv[1], sys.argv[2], sys.argv[3]
hostile = dns.name.Name([label.encode("latin-1") for label in sys.argv[4:]] + [b"test", b""])
family = socket.AF_INET6 if ":" in bind else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.bind((bind, 53))
while True:
    wire, peer = sock.recvfrom(4096)
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    rdtype = query.question[0].rdtype
    response.question = [dns.rrset.RRset(hostile, dns.rdataclass.IN, rdtype)]
    address = v4 if rdtype == dns.rdatatype.A else v6
    response.answer.append(dns.rrset.from_text(hostile, 30, "IN", dns.rdatatype.to_text(rdtype), address))
    sock.sendto(response.to_wire(), peer)
"""

# Asks a name over UDP without checking the answer's question, prints the address.
RAW_QUERY = r"""
import socket, sys
import dns.message
name, server = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(1)
sock.sendto(dns.message.make_query(name, "A").to_wire(), (server, 53))
print(dns.message.from_wire(sock.recv(4096)).answer[-1][0].address)
"""


@contextmanager
def resolv_conf(ns: Namespace, nameservers: Sequence[str]) -> Iterator[None]:
    """`ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf."""
    folder = f"/etc/netns/{ns.name}"
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/resolv.conf", "w") as handle:
        handle.write("".join(f"nameserver {server}\n" for server in nameservers) + "options timeout:2 attempts:1\n")
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def dnsmasq(ns: Namespace, listen: Sequence[str], records: Sequence[str]) -> Iterator[subprocess.Popen]:
    """dnsmasq answering only for `records` (--host-record / --cname arguments), over UDP and TCP."""
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--pid-file=",
        "--log-facility=/dev/null",
        *(f"--listen-address={a}" for a in listen),
        *records,
    ]
    proc = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(ns, listen[0], 53)  # dnsmasq also serves DNS over TCP on 53
        yield proc
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def hostile_dns(ns: Namespace, bind: str, v4: str, v6: str, labels: Sequence[str]) -> Iterator[subprocess.Popen]:
    """A DNS server answering with the question name made of `labels` (each at most 63 bytes)."""
    proc = ns.popen(
        [sys.executable, "-c", HOSTILE_SERVER, bind, v4, v6, *labels],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            if ns.run([sys.executable, "-c", RAW_QUERY, "probe.test", bind], check=False).returncode == 0:
                break
        else:
            raise TimeoutError("hostile DNS server did not answer")
        yield proc
    finally:
        proc.kill()
        proc.wait()
