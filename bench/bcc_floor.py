"""Start-up and memory floor of any BCC tool: a Python process that imports bcc and
loads a one-line program, then returns its freed heap as the auditor does. Prints
its private memory before that trim, then its running line, and waits for SIGINT."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

RUNNING = "bcc floor is running"


def anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    from bcc import BPF

    bpf = BPF(text=b"int floor(void *ctx) { return 0; }")
    bpf.load_func(b"floor", BPF.SOCKET_FILTER)
    untrimmed = anon_mb()
    import ctypes

    ctypes.CDLL(None).malloc_trim(0)
    print(f"untrimmed RssAnon {untrimmed:.1f} MiB", file=sys.stderr)
    print(RUNNING, file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
