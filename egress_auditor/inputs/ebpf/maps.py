"""Reading the flow map: every entry in batches of BPF_MAP_LOOKUP_BATCH (or
BPF_MAP_LOOKUP_AND_DELETE_BATCH, to empty a generation no program counts in
any more), into buffers kept between syncs, without a ctypes object per entry."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

SYNC_BATCH = 4096  # kernel flows read per bpf(2) call: small buffers, kept between syncs
_U64 = struct.Struct("=Q")
Entry = tuple[bytes, int, int, int, int, int]  # raw key, count, first_ns, last_ns, fp, fp2
Chunk = tuple[bytes, bytes, int]  # raw keys, raw values, entries


class FlowMapReader:
    def __init__(self) -> None:
        self._batch: tuple[Any, Any] | None = None  # (keys, values) buffers of SYNC_BATCH entries

    def entries(self, table: Any) -> Iterator[Entry]:
        """(raw key, count, first_ns, last_ns, fingerprint words) of every kernel flow, read in
        batches (BCC's items() makes two ctypes objects per flow per sync)."""
        try:
            yield from self.parse(table, self._copies(table, delete=False))
        except OSError:  # kernels before 5.6 have no batch lookup
            for key, value in table.items():
                yield bytes(key), value.count, value.first_ns, value.last_ns, value.fp, value.fp2

    def take(self, table: Any) -> list[Chunk]:
        """Every entry of a map no program writes to any more, deleted as it is read: raw chunks
        (keys, values, entries) to parse() later; cheap, so the map is empty again at once."""
        try:
            return list(self._copies(table, delete=True))
        except OSError:  # kernels before 5.6 have no batch operations
            items = table.items()
            table.clear()
            return [(b"".join(bytes(k) for k, _ in items), b"".join(bytes(v) for _, v in items), len(items))]

    @staticmethod
    def parse(table: Any, chunks: Iterable[Chunk]) -> Iterator[Entry]:
        """The entries of raw chunks, as entries() gives them."""
        leaf = table.Leaf
        offsets = (leaf.count.offset, leaf.first_ns.offset, leaf.last_ns.offset, leaf.fp.offset, leaf.fp2.offset)
        key_size, leaf_size = ctypes.sizeof(table.Key), ctypes.sizeof(leaf)
        for keys, values, n in chunks:
            for i in range(n):
                base = i * leaf_size
                count, first_ns, last_ns, fp, fp2 = (_U64.unpack_from(values, base + off)[0] for off in offsets)
                yield keys[i * key_size : (i + 1) * key_size], count, first_ns, last_ns, fp, fp2

    def _copies(self, table: Any, delete: bool) -> Iterator[Chunk]:
        key_size, leaf_size = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
        for keys, values, n in self._batches(table.map_fd, key_size, leaf_size, delete):
            yield keys, values.raw[: n * leaf_size], n

    def _batches(self, fd: int, key_size: int, leaf_size: int, delete: bool) -> Iterator[tuple[bytes, Any, int]]:
        """BPF_MAP_LOOKUP(_AND_DELETE)_BATCH until the map is exhausted: (keys bytes, values buffer, entries)."""
        from bcc.libbcc import lib

        if self._batch is None:
            self._batch = (
                ctypes.create_string_buffer(key_size * SYNC_BATCH),
                ctypes.create_string_buffer(leaf_size * SYNC_BATCH),
            )
        keys, values = self._batch
        token_in, token_out, count = ctypes.c_uint32(0), ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        while True:
            count.value = SYNC_BATCH
            start = None if first else ctypes.byref(token_in)
            call = lib.bpf_lookup_and_delete_batch if delete else lib.bpf_lookup_batch
            res = call(fd, start, ctypes.byref(token_out), keys, values, ctypes.byref(count))
            err = ctypes.get_errno()
            if res != 0 and err != errno.ENOENT:
                raise OSError(err, f"BPF_MAP_LOOKUP{'_AND_DELETE' if delete else ''}_BATCH: {os.strerror(err)}")
            if count.value:
                yield keys.raw[: count.value * key_size], values, count.value
            if res != 0:  # ENOENT: every entry has been read
                return
            token_in.value, first = token_out.value, False
