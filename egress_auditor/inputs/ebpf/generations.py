"""The two generations of the kernel flow map (bpf/flow_map.bpf.c), and their bookkeeping.

The programs count in the generation `flow_gens[0]` points to. flip() points
it at the other one: an update of a map of maps returns only after every BPF
program in flight has finished (the kernel's synchronize_rcu), so from then
on nothing is counted in the old generation, which can be read and emptied
exactly. Each generation holds a mark, the all-zero key, whose count is its
epoch: the programs copy it into the new-flow events counted there.

`GenerationLedger` keeps, per epoch, which flows arrived as events; takes a
generation out of the kernel at each flip; and settles it once the events are
read past its flip: a key without its event lost it and is to be recovered,
and counts beyond a flow's first connect are to be folded.
"""

from __future__ import annotations

import ctypes
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from egress_auditor.inputs.ebpf.maps import Chunk, FlowMapReader

MARK_FAMILY = 0  # the mark's key: no flow has family 0
FLIP_SHARE = 0.25  # flip once events read plus lost since the flip reach this share of max_flows: before it fills

Fold = tuple[bytes, int, int, int, int]  # (raw key, connections added, last_ns, fp, fp2)


class FlowGenerations:
    def __init__(self, bpf: Any) -> None:
        self._tables = (bpf["flows"], bpf["flows_next"])
        self._outer = bpf["flow_gens"]
        self.live = 0  # index of the generation the programs count in
        self.epoch = 1  # its epoch: never 0, which a new-flow event without a mark would carry
        self._point(0, self.epoch)

    @property
    def live_table(self) -> Any:
        return self._tables[self.live]

    def _point(self, index: int, epoch: int) -> None:
        table = self._tables[index]
        table[table.Key()] = table.Leaf(count=epoch)
        # Returns once no program can still count in the generation it replaces.
        self._outer[ctypes.c_int(0)] = ctypes.c_int(table.map_fd)

    def flip(self) -> tuple[Any, int]:
        """Count in the other generation from now on; returns the one left (no longer written to,
        to be read and emptied before the next flip) and its epoch."""
        old, old_epoch = self._tables[self.live], self.epoch
        self.live ^= 1
        self.epoch = (self.epoch % 0xFFFFFFFF) + 1
        self._point(self.live, self.epoch)
        return old, old_epoch


class GenerationLedger:
    """The generations' bookkeeping between the kernel and the events read: `table` is the flow map
    (its key and value layout), `events_lost` the kernel's count of events the buffer refused."""

    def __init__(self, gens: FlowGenerations, table: Any, events_lost: Callable[[], int]) -> None:
        self.gens = gens
        self._table = table
        self._family_at = int(table.Key.family.offset)
        self._events_lost = events_lost
        self._reader = FlowMapReader()
        self._announced: dict[int, set[bytes]] = {}  # per epoch not drained: raw keys whose event arrived
        self._drained_epoch = 0  # generations up to this epoch are settled: their late events are dropped
        self._lost_at_flip = 0  # events lost when the live generation began
        self.taken: deque[tuple[int, int, list[Chunk]]] = deque()  # (epoch, flip time, raw chunks), not settled
        self.recover: deque[tuple[bytes, int]] = deque()  # (raw key, first_ns) of settled flows that lost their event
        self.folds: list[Fold] = []  # counts of settled flows beyond their first connect

    def is_settled(self, epoch: int) -> bool:
        """Whether the generation of this epoch is settled: an event of it read now came too late."""
        return epoch <= self._drained_epoch

    def announce(self, epoch: int, raw: bytes) -> None:
        """The new-flow event of this flow map key arrived, counted in the generation of `epoch`."""
        self._announced.setdefault(epoch, set()).add(raw)

    def flip_due(self, max_flows: int) -> bool:
        """Whether the live generation may be filling: FLIP_SHARE of max_flows, counting every
        new-flow event read and every event lost since its flip."""
        live = len(self._announced.get(self.gens.epoch, ()))
        lost = self._events_lost() - self._lost_at_flip
        return live + lost >= max_flows * FLIP_SHARE

    def flip(self) -> int:
        """Count in the other generation; take the old one out of the kernel (it is empty after).
        Returns the time of the flip: every event of the old generation was written before it."""
        lost = self._events_lost()
        old, epoch = self.gens.flip()
        flipped = time.monotonic_ns()
        self._lost_at_flip = lost
        self.taken.append((epoch, flipped, self._reader.take(old)))
        return flipped

    def newest_flip(self) -> int | None:
        """The flip time of the newest generation taken and not settled, if any."""
        return self.taken[-1][1] if self.taken else None

    def settle(self, read_upto_ns: int) -> None:
        """Settle each taken generation whose events have all been read (or lost) by `read_upto_ns`:
        a key with no event of its epoch lost it, and is queued for recovery; counts beyond the
        first connect are queued to be folded."""
        family_at = self._family_at
        while self.taken and self.taken[0][1] <= read_upto_ns:
            epoch, _flipped, chunks = self.taken.popleft()
            announced = self._announced.pop(epoch, set())
            self._drained_epoch = epoch
            for raw, count, first_ns, last_ns, fp, fp2 in self._reader.parse(self._table, chunks):
                if raw[family_at] == MARK_FAMILY:
                    continue
                if raw not in announced:
                    self.recover.append((raw, first_ns))
                if count > 1:
                    self.folds.append((raw, count - 1, last_ns, fp, fp2))

    def take_folds(self) -> list[Fold]:
        """The counts queued to be folded so far, leaving none."""
        folds, self.folds = self.folds, []
        return folds
