"""Socket attribution against socket tables and /proc trees written here:
which line of /proc/net/{tcp,udp}{,6} sent a packet, and which process holds it."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import pytest

from egress_auditor.inputs.netfilter.packets import Packet
from egress_auditor.inputs.netfilter.sockets import SocketTable, match, parse_table
from egress_auditor.model import Family, Transport

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"


def hex4(address: str, port: int) -> str:
    raw = ipaddress.IPv4Address(address).packed
    if sys.byteorder == "little":
        raw = raw[::-1]
    return f"{raw.hex().upper()}:{port:04X}"


def hex6(address: str, port: int) -> str:
    raw = ipaddress.IPv6Address(address).packed
    words = [raw[i : i + 4][::-1] if sys.byteorder == "little" else raw[i : i + 4] for i in range(0, 16, 4)]
    return f"{b''.join(words).hex().upper()}:{port:04X}"


def line(local: str, remote: str, state: int, uid: int, inode: int) -> str:
    return f"   0: {local} {remote} {state:02X} 00000000:00000000 00:00000000 00000000 {uid:5d}        0 {inode} 1"


def tcp4(src: str, sport: int, dst: str, dport: int) -> Packet:
    return Packet(Family.IPV4, Transport.TCP, ipaddress.ip_address(src), sport, ipaddress.ip_address(dst), dport, 2)


def test_a_proc_net_line_is_read_in_host_byte_order() -> None:
    (entry,) = parse_table([HEADER, line(hex4("10.0.0.1", 40000), hex4("192.0.2.7", 443), 2, 1000, 555)])
    assert (str(entry.local), entry.lport, str(entry.remote), entry.rport) == ("10.0.0.1", 40000, "192.0.2.7", 443)
    assert (entry.state, entry.uid, entry.inode) == (2, 1000, 555)
    (six,) = parse_table([line(hex6("fd00::1", 5), hex6("2001:db8::7", 80), 2, 0, 9)])
    assert str(six.remote) == "2001:db8::7"


def test_only_wanted_ports_are_parsed() -> None:
    lines = [line(hex4("10.0.0.1", p), hex4("192.0.2.7", 443), 2, 0, p) for p in range(1000, 1100)]
    assert [e.inode for e in parse_table(lines, {1042})] == [1042]


def test_matching_a_packet_to_its_socket() -> None:
    entries = parse_table(
        [
            line(hex4("0.0.0.0", 40000), hex4("0.0.0.0", 0), 0x0A, 0, 1),  # a listener on the same port
            line(hex4("10.0.0.1", 40000), hex4("192.0.2.8", 443), 2, 0, 2),  # another destination
            line(hex4("10.0.0.1", 40000), hex4("192.0.2.7", 443), 2, 0, 3),
        ]
    )
    found = match(entries, tcp4("10.0.0.1", 40000, "192.0.2.7", 443))
    assert found is not None and found.inode == 3
    assert match(entries, tcp4("10.0.0.1", 40001, "192.0.2.7", 443)) is None


def test_a_dual_stack_socket_matches_an_ipv4_packet() -> None:
    entries = parse_table([line(hex6("::ffff:10.0.0.1", 40000), hex6("::ffff:192.0.2.7", 443), 2, 0, 77)])
    found = match(entries, tcp4("10.0.0.1", 40000, "192.0.2.7", 443))
    assert found is not None and found.inode == 77


def test_an_unconnected_udp_socket_matches_by_port() -> None:
    entries = parse_table([line(hex4("0.0.0.0", 5353), hex4("0.0.0.0", 0), 7, 1000, 88)])
    packet = Packet(Family.IPV4, Transport.UDP, ipaddress.ip_address("10.0.0.1"), 5353,
                    ipaddress.ip_address("192.0.2.53"), 53)  # fmt: skip
    found = match(entries, packet)
    assert found is not None and found.inode == 88


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    """A /proc with two processes, one holding socket 4242, and a socket table listing it."""
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(
        HEADER + "\n" + line(hex4("10.0.0.1", 40000), hex4("192.0.2.7", 443), 2, os.getuid(), 4242) + "\n"
    )
    (tmp_path / "net" / "tcp6").write_text(HEADER + "\n")
    for pid, comm, sockets in ((10, "sshd", [100]), (20, "curl", [4242, 4243])):
        fd = tmp_path / str(pid) / "fd"
        fd.mkdir(parents=True)
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
        os.symlink("/dev/null", fd / "0")
        for n, inode in enumerate(sockets, start=3):
            os.symlink(f"socket:[{inode}]", fd / str(n))
    return tmp_path


def test_the_owner_is_found_and_cached(fake_proc: Path) -> None:
    table = SocketTable(proc=fake_proc)
    (owner,) = table.owners([tcp4("10.0.0.1", 40000, "192.0.2.7", 443)])
    assert owner is not None and (owner.pid, owner.comm, owner.inode) == (20, "curl", 4242)
    # Found again without a full scan: the pid that held a socket before is looked at first.
    (fake_proc / "10" / "fd" / "3").unlink()
    table._next_full_scan = float("inf")
    (again,) = table.owners([tcp4("10.0.0.1", 40000, "192.0.2.7", 443)])
    assert again is not None and again.pid == 20
    assert (table.found, table.missed) == (2, 0)


def test_a_socket_that_is_gone_is_a_miss(fake_proc: Path) -> None:
    table = SocketTable(proc=fake_proc)
    assert table.owners([tcp4("10.0.0.1", 40001, "192.0.2.7", 443)]) == [None]
    assert table.missed == 1
