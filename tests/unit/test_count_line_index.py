"""Which count line a fingerprint goes to (egress_auditor/inputs/count_lines.py; the kernel's
count_in_line computes the same, which tests/kernel/test_ebpf_input.py checks on real flows).

NH sums are linear in the key's words, so the fingerprints of flows that differ only in their
port or address lie on a lattice: taken from the fingerprint's own bits, or multiplied alone,
the index crowds such flows into few lines for some keys, and their flows miss their slots.
These tests key the bench's load (100 addresses x 100 ports) as the kernel does."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from fingerprint import flow_key, nh_fingerprint

from egress_auditor.inputs.ebpf import count_lines_for
from egress_auditor.inputs.ebpf.count_lines import LINE_SLOTS, fingerprint_line, line_bits

LOOPBACK_NET = bytes([127, 100])  # the bench's destinations: 127.100.0.a


def bench_flows(comm_per_port: bool = False) -> list[bytes]:
    return [
        flow_key(LOOPBACK_NET + bytes([0, a]), 20000 + p, b"w%d" % p if comm_per_port else b"loadgen")
        for a in range(100)
        for p in range(100)
    ]


def slots_missed(fingerprints: list[int], lines: int) -> int:
    """Flows left without a slot: those beyond the first LINE_SLOTS of their line."""
    per_line = Counter(fingerprint_line(fp, lines) for fp in fingerprints)
    return sum(max(0, n - LINE_SLOTS) for n in per_line.values())


@pytest.mark.parametrize("seed", range(8))
def test_flows_that_differ_by_port_spread_over_the_lines_whatever_the_keys(seed: int) -> None:
    rng = random.Random(seed)
    keys = [rng.getrandbits(32) for _ in range(12)]
    lines = count_lines_for("auto", 65536, "ringbuf")
    for comm_per_port in (False, True):
        fps = [nh_fingerprint(keys, raw)[0] for raw in bench_flows(comm_per_port)]
        assert len(set(fps)) == 10_000
        # As if thrown at random (Poisson, 0.3 flows per line): about 130 of 10,000 find their line full.
        assert slots_missed(fps, lines) <= 200, comm_per_port


def test_the_index_stays_inside_the_array_for_every_size() -> None:
    rng = random.Random(7)
    for bits in (0, 1, 5, 14, 16, 31, 32):
        lines = 1 << bits
        assert line_bits(lines) == bits
        for _ in range(200):
            assert 0 <= fingerprint_line(rng.getrandbits(64), lines) < lines
    assert fingerprint_line((1 << 64) - 1, 1) == 0


@pytest.mark.parametrize("lines", [0, 3, 12, (1 << 32) + 1, 1 << 33])
def test_a_line_count_that_is_not_a_power_of_two_up_to_2_32_is_refused(lines: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        line_bits(lines)
