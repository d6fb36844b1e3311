"""Benchmark reference tracer: bench/per_event.bpf.c sends every connect
through the ring buffer and this consumer decodes and counts each one in
Python, as a tracer without in-kernel counting must. Run as root; prints
RUNNING_LINE on stderr once attached and a JSON summary on stdout at SIGINT."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

RUNNING_LINE = "per-event reference is running"
HERE = Path(__file__).resolve().parent
BPF_INCLUDE = HERE.parent / "bpf"


class Consumer:
    def __init__(self, pages: int) -> None:
        from bcc import BPF  # only this process needs BCC

        self.bpf = BPF(
            src_file=str(HERE / "per_event.bpf.c").encode(),
            cflags=[f"-I{BPF_INCLUDE}", f"-DEA_RINGBUF_PAGES={pages}"],
        )
        self.events = self.bpf["events"]
        self.events.open_ring_buffer(self._on_event)
        self.flows: dict[tuple[bytes, int, int, bytes], int] = {}
        self.received = 0
        self.stopping = False

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> None:
        # The per-event work every such tracer pays: decode, key, count.
        event = self.events.event(data)
        key = (bytes(event.daddr[:4]), event.dport, event.uid, bytes(event.comm))
        self.flows[key] = self.flows.get(key, 0) + 1
        self.received += 1

    def run(self) -> dict[str, int]:
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        print(RUNNING_LINE, file=sys.stderr, flush=True)
        while not self.stopping:
            self.bpf.ring_buffer_poll(100)
        self.bpf.ring_buffer_consume()
        stats = self.bpf["stats"]
        summary = {
            "received": self.received,
            "flows": len(self.flows),
            "connects": int(stats.sum(0).value),
            "lost": int(stats.sum(1).value),
        }
        self.bpf.cleanup()
        return summary

    def _stop(self, _signum: int, _frame: object) -> None:
        self.stopping = True


def main() -> None:
    pages = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    print(json.dumps(Consumer(pages).run()))


if __name__ == "__main__":
    main()
