"""Run time per TCP connect of each attach path the kernel offers, side by side:
`sudo .venv/bin/python bench/path_cost.py` (in the VMs: scripts/vm_test.py --bench).

One eBPF input per path (fentry, kprobe, cgroup, tracepoint; UDP and DNS off) is opened, all
at once, so every connect runs each path's program and a busy host slows them alike. One
connect makes the flow and a sync gives it its count line, then ROUNDS rounds of CONNECTS
connects to a closed loopback port are timed by the kernel's own counters
(kernel.bpf_stats_enabled: run_time_ns of the programs each input loaded, over the connects
made). The lowest round is the least disturbed by other work on the host. These counters
time the programs only, not how the kernel reaches them (a kprobe's breakpoint or ftrace
call, a trampoline, a cgroup's program array). Prints a Markdown table. Needs root.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import sys

if not __package__:  # run as a file: bench/ is sys.path[0], the project is not (bench/checkout.py)
    import checkout  # noqa: F401

from bench.harness import bpf_programs, bpf_stats
from egress_auditor.errors import AuditorError
from egress_auditor.inputs.ebpf import PLUGIN, EbpfInput

PATHS = ("fentry", "kprobe", "cgroup", "tracepoint")
ROUNDS, CONNECTS = 15, 1000


def connects(port: int, count: int) -> None:
    """Connects to a closed loopback port: refused at once, and each a whole tcp_v4_connect."""
    for _ in range(count):
        s = socket.socket()
        s.connect_ex(("127.0.0.1", port))
        s.close()


def main() -> int:
    port = 29200
    opened: dict[str, tuple[EbpfInput, set[int]]] = {}
    refused: dict[str, str] = {}
    try:
        for path in PATHS:
            before = set(bpf_programs())
            source = EbpfInput(PLUGIN.defaults() | {"probe": path, "udp": "off", "dns": "off"})
            try:
                source.open()
            except AuditorError as exc:
                refused[path] = str(exc)
                continue
            opened[path] = (source, set(bpf_programs()) - before)
        connects(port, 1)
        for source, _ in opened.values():  # the flow is known and has its count line: the steady state
            source.poll(0.2, lambda _conn: None)
            source.sync(lambda _conn: None, lambda *_count: None)
        rounds: dict[str, list[float]] = {path: [] for path in opened}
        with bpf_stats():
            for _ in range(ROUNDS):
                start = bpf_programs()
                connects(port, CONNECTS)
                end = bpf_programs()
                for path, (_, ours) in opened.items():
                    ns = sum(end[i].get("run_time_ns", 0) - start[i].get("run_time_ns", 0) for i in ours if i in end)
                    rounds[path].append(ns / CONNECTS)
    finally:
        for source, _ in opened.values():
            source.close()
    print(f"Kernel {os.uname().release} ({platform.machine()}), {ROUNDS} rounds of {CONNECTS} connects, every path")
    print("attached at once (each connect runs them all):\n")
    print("| path | ns per connect: lowest round | median | highest |")
    print("| --- | --- | --- | --- |")
    for path in PATHS:
        if path in rounds:
            r = rounds[path]
            print(f"| {path} | {min(r):.0f} | {statistics.median(r):.0f} | {max(r):.0f} |")
        else:
            print(f"| {path} | did not load: {refused[path]} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
