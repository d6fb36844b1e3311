"""The two generations of the kernel flow map (bpf/flow_map.bpf.c).

The programs count in the generation `flow_gens[0]` points to. flip() points
it at the other one: an update of a map of maps returns only after every BPF
program in flight has finished (the kernel's synchronize_rcu), so from then
on nothing is counted in the old generation, which can be read and emptied
exactly. Each generation holds a mark, the all-zero key, whose count is its
epoch: the programs copy it into the new-flow events counted there.
"""

from __future__ import annotations

import ctypes
from typing import Any

MARK_FAMILY = 0  # the mark's key: no flow has family 0


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
