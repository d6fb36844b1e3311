"""The kernel's count lines (bpf/flow_map.bpf.c), mapped into this process.

Each 64-byte line holds two slots of four 64-bit words: the fingerprint's
two words, count, last time. User space claims a free slot for a flow by
writing the flow's fingerprint into it, second word first, each one aligned
8-byte store (the first word, non-zero, makes the slot taken); from then on the kernel
counts the flow's repeats in that slot instead of the flow map, so a flow's
count is what the map's generations counted before plus its slot's count.
Only user space writes fingerprints, so two flows never race for a slot. A
flow whose line is full stays in the flow map.
"""

from __future__ import annotations

import ctypes
import mmap
from array import array

# The layout below repeats bpf/events.h (struct ea_count_slot); tests/unit/test_events_header.py checks it.
LINE_BYTES = 64
LINE_SLOTS = 2  # EA_LINE_SLOTS
SLOT_WORDS = 4  # fp, fp2, count, last_ns
FP, FP2, COUNT, LAST_NS = 0, 1, 2, 3


# The fingerprint's line: its high word folded onto its low word, times an odd constant, top bits.
# NH sums are linear in the key's words, so fingerprints of flows that differ only in their port lie
# on a lattice: their own bits (or a multiply alone) crowd such flows into few lines for some keys.
LINE_MUL = 0x9E3779B97F4A7C15  # odd: 2^64 / the golden ratio


def fingerprint_line(fp: int, lines: int) -> int:
    """The line the kernel looks in for a fingerprint (count_in_line): the top log2(lines) bits of
    (fp ^ fp >> 32) * LINE_MUL, taken in two shifts as the kernel does (one line: all shifted out)."""
    folded = fp ^ (fp >> 32)
    return ((folded * LINE_MUL) & 0xFFFFFFFFFFFFFFFF) >> 32 >> (32 - line_bits(lines))


def line_bits(lines: int) -> int:
    """log2 of a power of two of lines, at most 2^32."""
    if lines < 1 or lines & (lines - 1) or lines > 1 << 32:
        raise ValueError(f"count lines must be a power of two up to 2^32, not {lines}")
    return lines.bit_length() - 1


class CountLines:
    """Slots claimed by fingerprint, and the counts the kernel keeps in them."""

    def __init__(self, map_fd: int, lines: int) -> None:
        line_bits(lines)  # refuses a count that is not a power of two
        self.lines = lines
        size = lines * LINE_BYTES
        length = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE  # the kernel maps whole pages
        self._map = mmap.mmap(map_fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # One ctypes array over the mapping: element access is one aligned 8-byte load or store.
        self._words: ctypes.Array[ctypes.c_uint64] | None = (ctypes.c_uint64 * (size // 8)).from_buffer(self._map)
        slots = lines * LINE_SLOTS
        self.owner: list[bytes | None] = [None] * slots  # per slot: the flow map key that owns it (raw bytes)
        self.reported = array("Q", bytes(8 * slots))  # per slot: its count as last folded by sync
        self.claimed = array("I")  # slots in the order they were claimed

    def _word(self, slot: int, field: int) -> int:
        assert self._words is not None, "count lines used after close"
        return int(self._words[slot * SLOT_WORDS + field])

    def claim(self, fp: int, fp2: int, owner: bytes) -> int | None:
        """A slot for this fingerprint: its own if it has one, else a free one; None if the line is full."""
        assert self._words is not None, "count lines used after close"
        first = fingerprint_line(fp, self.lines) * LINE_SLOTS
        for slot in range(first, first + LINE_SLOTS):
            held = self._word(slot, FP)
            if held == fp and self._word(slot, FP2) == fp2:
                return slot
            if held == 0:
                self._words[slot * SLOT_WORDS + FP2] = fp2
                self._words[slot * SLOT_WORDS + FP] = fp
                self.owner[slot] = owner
                self.claimed.append(slot)
                return slot
        return None

    def count(self, slot: int) -> int:
        return self._word(slot, COUNT)

    def last_ns(self, slot: int) -> int:
        return self._word(slot, LAST_NS)

    def close(self) -> None:
        self._words = None  # the mapping cannot close while a ctypes view holds it
        self._map.close()
