"""Packet parsing, nfnetlink messages, loss counting and the rule text of the
netfilter inputs: built byte by byte here, checked field by field."""

from __future__ import annotations

import ipaddress
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from egress_auditor.inputs.netfilter import netlink, packets
from egress_auditor.inputs.netfilter.reader import LossCounter
from egress_auditor.inputs.netfilter.taps import (
    Owner,
    Target,
    host_writes_nft,
    iptables_commands,
    nft_script,
    nft_tables,
    process_start,
    tagged_iptables_rules,
)
from egress_auditor.model import Family, Transport

SRC4, DST4 = "10.0.0.1", "192.0.2.7"
SRC6, DST6 = "fd00::1", "2001:db8::7"


def tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8, 0)


def ipv4(proto: int, body: bytes, options: bytes = b"", fragment: int = 0) -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(body), 1, fragment, 64, proto, 0,
                         socket.inet_aton(SRC4), socket.inet_aton(DST4))  # fmt: skip
    return header + options + body


def ipv6(next_header: int, body: bytes) -> bytes:
    addresses = socket.inet_pton(socket.AF_INET6, SRC6) + socket.inet_pton(socket.AF_INET6, DST6)
    return struct.pack("!IHBB", 6 << 28, len(body), next_header, 64) + addresses + body


def test_ipv4_tcp_syn() -> None:
    packet = packets.parse(ipv4(6, tcp(40000, 443, packets.TCP_SYN)))
    assert packet == packets.Packet(
        Family.IPV4, Transport.TCP, ipaddress.ip_address(SRC4), 40000, ipaddress.ip_address(DST4), 443, 0x02, 1
    )
    assert packet.is_connection_start


def test_ipv4_options_are_skipped() -> None:
    packet = packets.parse(ipv4(6, tcp(1, 22, packets.TCP_SYN), options=b"\x01" * 8))
    assert packet is not None and (packet.sport, packet.dport) == (1, 22)


def test_only_a_bare_syn_starts_a_tcp_connection() -> None:
    for flags in (packets.TCP_SYN | packets.TCP_ACK, packets.TCP_ACK, packets.TCP_SYN | packets.TCP_RST, 0):
        packet = packets.parse(ipv4(6, tcp(1, 2, flags)))
        assert packet is not None and not packet.is_connection_start, flags
    ecn_syn = packets.parse(ipv4(6, tcp(1, 2, packets.TCP_SYN | 0xC0)))  # ECE and CWR ride on ECN SYNs
    assert ecn_syn is not None and ecn_syn.is_connection_start


def test_ipv4_udp_and_later_fragments() -> None:
    packet = packets.parse(ipv4(17, udp(5353, 53)))
    assert packet is not None and packet.protocol is Transport.UDP and packet.dport == 53 and packet.is_connection_start
    assert packets.parse(ipv4(17, udp(5353, 53), fragment=0x0010)) is None  # offset 16*8: no ports there
    assert packets.parse(ipv4(1, b"\x08\x00" + b"\0" * 6)) is None  # ICMP is not a connection


def test_ipv6_tcp_and_udp() -> None:
    syn = packets.parse(ipv6(6, tcp(50000, 5432, packets.TCP_SYN)))
    assert syn is not None and syn.family is Family.IPV6 and str(syn.dst) == DST6 and syn.dport == 5432
    datagram = packets.parse(ipv6(17, udp(1, 123)))
    assert datagram is not None and datagram.protocol is Transport.UDP and datagram.dport == 123


def test_ipv6_extension_headers_are_walked() -> None:
    hop_by_hop = bytes([60, 0]) + b"\0" * 6  # then a destination-options header
    destination = bytes([44, 1]) + b"\0" * 14  # 16 bytes, then a fragment header
    fragment = bytes([6, 0]) + struct.pack("!HI", 0, 1)  # first fragment
    packet = packets.parse(ipv6(0, hop_by_hop + destination + fragment + tcp(1, 8443, packets.TCP_SYN)))
    assert packet is not None and packet.dport == 8443
    later = bytes([6, 0]) + struct.pack("!HI", 8 << 3, 1)
    assert packets.parse(ipv6(44, later + tcp(1, 8443, packets.TCP_SYN))) is None


def test_an_endless_extension_chain_stops() -> None:
    chain = (bytes([0, 0]) + b"\0" * 6) * 20
    assert packets.parse(ipv6(0, chain)) is None


@given(st.binary(max_size=120))
def test_any_bytes_parse_or_give_none(data: bytes) -> None:
    packet = packets.parse(data)
    assert packet is None or 0 <= packet.sport <= 65535


@given(st.binary(max_size=80), st.integers(0, 80))
def test_cut_packets_never_raise(tail: bytes, cut: int) -> None:
    whole = ipv6(0, bytes([6, 0]) + b"\0" * 6 + tcp(1, 2, 2)) + tail
    assert packets.parse(whole[:cut]) is None or cut >= 40


# -- netlink -------------------------------------------------------------------


def nflog_message(seq: int, payload: bytes, uid: int, gid: int) -> bytes:
    attrs = (
        netlink.attribute(netlink.NFULA_PACKET_HDR, struct.pack("!HBx", 0x0800, 3))
        + netlink.attribute(netlink.NFULA_PAYLOAD, payload)
        + netlink.attribute(netlink.NFULA_UID, struct.pack("!I", uid))
        + netlink.attribute(netlink.NFULA_GID, struct.pack("!I", gid))
        + netlink.attribute(netlink.NFULA_SEQ, struct.pack("!I", seq))
    )
    return netlink.message(netlink.NFNL_SUBSYS_ULOG << 8, 0, 0, socket.AF_INET, 100, attrs)


def test_an_nflog_batch_is_decoded() -> None:
    payload = ipv4(6, tcp(40000, 443, packets.TCP_SYN))
    batch = nflog_message(7, payload, 1000, 1001) + nflog_message(8, payload, 0, 0)
    messages = list(netlink.NetfilterSocket.decode(batch))
    assert [(m.family, m.res_id) for m in messages] == [(socket.AF_INET, 100)] * 2
    logged = [netlink.NflogGroup.packet(m) for m in messages]
    assert [(p.seq, p.uid, p.gid) for p in logged if p] == [(7, 1000, 1001), (8, 0, 0)]
    assert logged[0] is not None and logged[0].payload == payload


def test_a_queued_packet_is_decoded() -> None:
    attrs = (
        netlink.attribute(netlink.NFQA_PACKET_HDR, struct.pack("!IHB", 42, 0x86DD, 3))
        + netlink.attribute(netlink.NFQA_PAYLOAD, b"\x60payload")
        + netlink.attribute(netlink.NFQA_UID, struct.pack("!I", 65534))
    )
    raw = netlink.message(netlink.NFNL_SUBSYS_QUEUE << 8, 0, 0, socket.AF_INET6, 5, attrs)
    (msg,) = netlink.NetfilterSocket.decode(raw)
    queued = netlink.NfQueue.packet(msg)
    assert queued == netlink.QueuedPacket(42, b"\x60payload", 65534, None)


def test_the_last_packet_id_is_read_for_the_verdict() -> None:
    def queued(packet_id: int, header_first: bool) -> bytes:
        header = netlink.attribute(netlink.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3))
        payload = netlink.attribute(netlink.NFQA_PAYLOAD, b"\x45")
        attrs = header + payload if header_first else payload + header
        return netlink.message(netlink.NFNL_SUBSYS_QUEUE << 8, 0, 0, socket.AF_INET, 1, attrs)

    assert netlink.NfQueue.last_packet_id(queued(3, True) + queued(4, False) + queued(9, True)) == 9
    assert netlink.NfQueue.last_packet_id(queued(3, True) + queued(4, False)) == 4
    assert netlink.NfQueue.last_packet_id(b"") is None


def test_attributes_are_padded_and_bounded() -> None:
    data = netlink.attribute(1, b"abc") + netlink.attribute(2, b"")
    assert len(data) == 12
    assert netlink.parse_attributes(data, 0, len(data)) == {1: b"abc", 2: b""}
    assert netlink.parse_attributes(data[:6], 0, 6) == {}  # a cut attribute is dropped, not read past


@given(st.binary(max_size=200))
def test_garbage_datagrams_decode_without_raising(data: bytes) -> None:
    for msg in netlink.NetfilterSocket.decode(data):
        netlink.NflogGroup.packet(msg)
        netlink.NfQueue.packet(msg)


def test_loss_counter_counts_gaps_and_survives_wrap() -> None:
    counter = LossCounter()
    for seq in (0, 1, 2, 5, 6, 10):
        counter.see(seq)
    assert counter.lost == 2 + 3
    counter.see(3)  # an old number: a restart, never a huge loss
    assert counter.lost == 5
    wrapping = LossCounter()
    for seq in (2**32 - 2, 2**32 - 1, 1):  # the 32-bit number wraps; 0 was lost
        wrapping.see(seq)
    assert wrapping.lost == 1


# -- rules ---------------------------------------------------------------------


def test_nfqueue_rules_bypass_and_go_last() -> None:
    owner = Owner("nfqueue", 123, 456)
    commands = iptables_commands(Target("nfqueue", 9), owner)
    assert len(commands) == 2
    for args in commands:
        assert args[:6] == ["-w", "5", "-t", "mangle", "-A", "OUTPUT"]
        assert args[-5:] == ["-j", "NFQUEUE", "--queue-num", "9", "--queue-bypass"]
        assert "egress-auditor nfqueue pid=123 start=456" in args
    assert "--syn" in commands[0] and "udp" in commands[1]
    script = nft_script(Target("nfqueue", 9), owner)
    assert script.count("queue num 9 bypass") == 2 and "table inet egress_auditor_nfqueue_123_456" in script


def test_nflog_rules_go_first() -> None:
    commands = iptables_commands(Target("nflog", 100), Owner("nflog", 1, 2))
    assert all(args[4:7] == ["-I", "OUTPUT", "1"] for args in commands)
    assert "udp" in commands[0] and "--syn" in commands[1]  # inserted at 1 in turn: TCP ends up first
    assert nft_script(Target("nflog", 100), Owner("nflog", 1, 2)).count("log group 100 comment") == 2


def test_tagged_rules_are_found_in_iptables_s_output() -> None:
    lines = [
        "-P OUTPUT ACCEPT",
        '-A OUTPUT -p udp -m comment --comment "something else" -j ACCEPT',
        '-A OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -m comment '
        '--comment "egress-auditor nflog pid=77 start=88" -j NFLOG --nflog-group 100',
    ]  # fmt: skip
    ((owner, delete),) = tagged_iptables_rules(lines)
    assert owner == Owner("nflog", 77, 88)
    assert delete[:3] == ["-D", "OUTPUT", "-p"] and "egress-auditor nflog pid=77 start=88" in delete


def test_owner_liveness_uses_the_start_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stat = "4242 (a name) with) S " + " ".join(["0"] * 18) + " 999 0 0"
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "stat").write_text(stat)
    assert process_start(4242, tmp_path) == 999
    assert Owner("nflog", 4242, 999).alive(tmp_path)
    assert not Owner("nflog", 4242, 998).alive(tmp_path)  # the pid was reused by a later process
    assert not Owner("nflog", 4243, 999).alive(tmp_path)
    assert Owner.parse(Owner("nfqueue", 1, 2).comment) == Owner("nfqueue", 1, 2)


def test_which_nft_tables_are_ours_and_whether_the_host_writes_nft() -> None:
    listing = "table ip mangle\ntable ip6 mangle\ntable inet egress_auditor_nflog_12_34\n"
    assert nft_tables(listing) == [(Owner("nflog", 12, 34), "egress_auditor_nflog_12_34")]
    assert not host_writes_nft(listing)  # iptables-nft's tables and ours only
    assert host_writes_nft(listing + "table inet filter\n")
    assert host_writes_nft("table ip firewalld\n")
