"""The count lines' fingerprint of a flow map key (struct ea_flow_key), computed in Python as
bpf/fingerprint.bpf.h's flow_fingerprint should: two NH sums over the key's ten 32-bit words,
the second with the keys two words on. A reference for the tests, not used by the product."""

from __future__ import annotations

import struct
from collections.abc import Sequence

MASK32, MASK64 = 0xFFFFFFFF, (1 << 64) - 1


def flow_key(address: bytes, port: int, comm: bytes, uid: int = 0, family: int = 2, protocol: int = 6) -> bytes:
    """struct ea_flow_key: daddr[16] (IPv4 in the first 4 bytes), uid, dport, family, protocol, comm[16]."""
    return struct.pack("<16sIHBB16s", address, uid, port, family, protocol, comm)


def nh_fingerprint(keys: Sequence[int], raw: bytes) -> tuple[int, int]:
    m = struct.unpack("<10I", raw)

    def nh(k: Sequence[int]) -> int:
        pairs = (((m[i] + k[i]) & MASK32) * ((m[i + 1] + k[i + 1]) & MASK32) for i in range(0, 10, 2))
        return sum(pairs) & MASK64

    return nh(keys[:10]) or 1, nh(keys[2:12])
