"""Parsing the start of an IP packet copied by NFLOG or NFQUEUE.

Only what an outbound connection is made of: family, protocol, addresses,
ports, and for TCP whether it is a connection's first SYN. Packets arrive
from the kernel but their bytes were written by local processes (raw
sockets), so every length is checked and anything short or odd gives None.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from egress_auditor.model import Family, IPAddress, Transport

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
# IPv6 extension headers that may come before TCP/UDP and share the (next, length) layout.
_IPV6_EXTENSIONS = {0, 43, 60, 135, 139, 140}  # hop-by-hop, routing, destination, mobility, HIP, shim6
_IPV6_FRAGMENT = 44
_MAX_EXTENSIONS = 8  # a bound on the walk: hostile chains cannot make it loop long


@dataclass(frozen=True)
class Packet:
    family: Family
    protocol: Transport
    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int
    tcp_flags: int = 0  # 0 for UDP
    tcp_seq: int = 0  # the initial sequence number of a SYN: a retransmit repeats it, a new connection does not

    @property
    def is_connection_start(self) -> bool:
        """A TCP SYN without ACK/RST/FIN, or any UDP packet (the rules match conntrack NEW)."""
        if self.protocol is Transport.UDP:
            return True
        return self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN


def parse(data: bytes) -> Packet | None:
    """The packet's family from its version nibble; None if it is not TCP/UDP or is cut short."""
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data)
    if version == 6:
        return _parse_ipv6(data)
    return None


def _parse_ipv4(data: bytes) -> Packet | None:
    if len(data) < 20:
        return None
    header_len = (data[0] & 0x0F) * 4
    fragment = struct.unpack_from("!H", data, 6)[0]
    if header_len < 20 or fragment & 0x1FFF:  # a later fragment holds no ports
        return None
    protocol = data[9]
    src = ipaddress.IPv4Address(data[12:16])
    dst = ipaddress.IPv4Address(data[16:20])
    return _transport(Family.IPV4, protocol, data, header_len, src, dst)


def _parse_ipv6(data: bytes) -> Packet | None:
    if len(data) < 40:
        return None
    next_header = data[6]
    src = ipaddress.IPv6Address(data[8:24])
    dst = ipaddress.IPv6Address(data[24:40])
    offset = 40
    for _ in range(_MAX_EXTENSIONS):
        if next_header in (Transport.TCP, Transport.UDP):
            return _transport(Family.IPV6, next_header, data, offset, src, dst)
        if next_header == _IPV6_FRAGMENT:
            if len(data) < offset + 8 or struct.unpack_from("!H", data, offset + 2)[0] & 0xFFF8:
                return None  # short, or not the first fragment
            next_header, offset = data[offset], offset + 8
        elif next_header in _IPV6_EXTENSIONS:
            if len(data) < offset + 2:
                return None
            next_header, offset = data[offset], offset + (data[offset + 1] + 1) * 8
        else:
            return None
    return None


def _transport(
    family: Family, protocol: int, data: bytes, offset: int, src: IPAddress, dst: IPAddress
) -> Packet | None:
    if protocol == Transport.TCP:
        if len(data) < offset + 14:
            return None
        sport, dport, seq = struct.unpack_from("!HHI", data, offset)
        return Packet(family, Transport.TCP, src, sport, dst, dport, data[offset + 13], seq)
    if protocol == Transport.UDP:
        if len(data) < offset + 4:
            return None
        sport, dport = struct.unpack_from("!HH", data, offset)
        return Packet(family, Transport.UDP, src, sport, dst, dport)
    return None
