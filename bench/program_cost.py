"""Where the eBPF input's cost goes: `sudo .venv/bin/python bench/program_cost.py`.

Three measurements on the load of bench/run.py (TCP connects over 10,000 flows):
- run time of each BPF program per connect, from the kernel's own counters
  (`kernel.bpf_stats_enabled`, read with bpftool), with the auditor running;
- the connect hook's run time over 100 flows against 10,000 (the flow map's
  entries are in the CPU caches, or not, when their flow comes round);
- what a cgroup hook costs with an empty program on it (connect rate with and
  without, alternating), which no run-time counter shows.
Writes its section of docs/benchmarks.md. Needs root."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: bench/ is sys.path[0], the project is not (bench/checkout.py)
    import checkout  # noqa: F401

from bench.harness import (
    AUDITOR_RUNNING,
    ROOT,
    SYNC_MARGIN_S,
    Namespace,
    Spread,
    Tracer,
    auditor_command,
    bpf_programs,
    bpf_stats,
    build_loadgen,
    namespace,
    run_client,
    running,
    server,
    wait_for_flows,
)
from bench.report import replace_section

SECTION_BEGIN = "<!-- programs:begin (bench/program_cost.py) -->"
SECTION_END = "<!-- programs:end -->"
PORTS = 100
EMPTY_PROGRAMS = b"""
int empty_skb(struct __sk_buff *skb) { return 1; }
int empty_addr(struct bpf_sock_addr *ctx) { return 1; }
"""


def run_times(ns: Namespace, loadgen: Path, addrs: int, workdir: Path, *extra: str) -> tuple[int, list[dict]]:
    """Connects made, and each auditor program's runs and run time over a 3 s load."""
    argv = [*auditor_command(), "trace", "-i", "ebpf", "--no-live", *extra]
    tracer = Tracer(argv, AUDITOR_RUNNING, workdir, f"programs-{addrs}")
    with running(tracer):
        run_client(ns, loadgen, addrs, PORTS, count=addrs * PORTS)
        wait_for_flows(tracer, set(), addrs * PORTS, 120)
        time.sleep(SYNC_MARGIN_S)  # one sync gives the known flows their count line slots: the steady state
        with bpf_stats():
            before = bpf_programs()
            load = run_client(ns, loadgen, addrs, PORTS, seconds=3)
            after = bpf_programs()
        tracer.stop()
    rows = []
    for pid, prog in after.items():
        runs = prog.get("run_cnt", 0) - before.get(pid, {}).get("run_cnt", 0)
        ns_total = prog.get("run_time_ns", 0) - before.get(pid, {}).get("run_time_ns", 0)
        if pid in before and runs > 0:
            rows.append({"name": prog.get("name", "?"), "type": prog["type"], "runs": runs, "ns": ns_total})
    return load.timed_connects, sorted(rows, key=lambda r: -r["ns"])


def hook_cost(ns: Namespace, loadgen: Path, rounds: int) -> dict[str, dict[str, Any]]:
    """Connect rate with an empty program on a cgroup hook / without, alternating, per hook."""
    from bcc import BPF, BPFAttachType

    bpf = BPF(text=EMPTY_PROGRAMS)
    hooks = {
        "cgroup_skb ingress": (b"empty_skb", BPF.CGROUP_SKB, BPFAttachType.CGROUP_INET_INGRESS),
        "cgroup_skb egress": (b"empty_skb", BPF.CGROUP_SKB, BPFAttachType.CGROUP_INET_EGRESS),
        "connect4": (b"empty_addr", BPF.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_INET4_CONNECT),
    }
    from egress_auditor.host import facts

    root = facts.cgroup2_root()
    if root is None:
        raise SystemExit("program_cost: no cgroup v2 mount")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    results = {}
    try:
        for label, (name, prog_type, attach_type) in hooks.items():
            fn = bpf.load_func(name, prog_type, attach_type=attach_type)
            ratios = []
            for _ in range(rounds):
                off = run_client(ns, loadgen, 100, PORTS, seconds=1).rate
                BPF.attach_func(fn, fd, attach_type, 2)
                try:
                    on = run_client(ns, loadgen, 100, PORTS, seconds=1).rate
                finally:
                    BPF.detach_func(fn, fd, attach_type)
                ratios.append(on / off)
            results[label] = Spread.of(ratios).as_dict()
            bpf.funcs.pop(name, None)  # BCC caches by name: load again for the next attach type
    finally:
        os.close(fd)
        bpf.cleanup()
    return results


def markdown(data: dict[str, Any]) -> str:
    connects = data["connects"]
    lines = [
        SECTION_BEGIN,
        "## Where the eBPF input's cost goes (bench/program_cost.py)",
        "",
        f"`sudo .venv/bin/python bench/program_cost.py`. The load of `bench/run.py` ({connects:,} connects in 3 s "
        "over 10,000 flows) with `trace -i ebpf` (the defaults, DNS names included); each program's "
        "runs and run time from the kernel's counters (`kernel.bpf_stats_enabled`, which adds a clock read, "
        "some 40 ns, to every run).",
        "",
        "| program | type | runs per connect | ns per run | ns per connect |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in data["programs"]:
        if row["runs"] / connects < 0.01:
            continue
        lines.append(
            f"| {row['name']} | {row['type']} | {row['runs'] / connects:.2f} | {row['ns'] / row['runs']:.0f} "
            f"| {row['ns'] / connects:.0f} |"
        )
    few, many = data["connect_hook_ns"]["100"], data["connect_hook_ns"]["10000"]
    lines += [
        "",
        f"- The connect hook over 100 flows in turn: {few:.0f} ns per run; over 10,000: {many:.0f} ns (after "
        "one sync, so that known flows count in their count lines). The difference is the flow's count line "
        "missing the CPU caches: it is touched again only after every other flow's, and each connect's own "
        "memory evicts it long before. The counters' clock reads wait for that miss; without them the CPU "
        "goes on with the connect meanwhile, so these times overstate what a change to the program gains: "
        "judge it by the connect ratio (docs/decisions/connect-cost.md).",
        "- An empty program on a hook, connect rate with it / without (alternating 1 s rounds, median): "
        + "; ".join(
            f"{hook} {d['median']:.3f} (IQR {d['q1']:.3f}-{d['q3']:.3f}, n={d['n']})"
            for hook, d in data["empty_hooks"].items()
        )
        + ". The cgroup_skb hooks run for every packet of every socket, TCP included, whatever the program does.",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="alternating rounds per empty hook")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/program_cost.py needs root (BPF programs, network namespaces)")
    loadgen = build_loadgen()
    workdir = ROOT / "bench" / "build" / "program-cost"
    workdir.mkdir(parents=True, exist_ok=True)
    with namespace() as ns, server(ns, loadgen, PORTS, lifetime_s=3600):
        # Every program the input has: the defaults and the DNS answers' ingress program.
        connects, rows = run_times(ns, loadgen, 100, workdir, "-I", "ebpf:dns:on")
        hook = {}
        for addrs in (1, 100):
            _made, few = run_times(ns, loadgen, addrs, workdir, "-I", "ebpf:udp:off", "-I", "ebpf:dns:off")
            runs = [r for r in few if r["name"] == "connect4"]
            hook[str(addrs * PORTS)] = statistics.fmean(r["ns"] / r["runs"] for r in runs) if runs else 0.0
        empty = hook_cost(ns, loadgen, args.rounds)
    data = {"connects": connects, "programs": rows, "connect_hook_ns": hook, "empty_hooks": empty}
    replace_section(args.markdown, SECTION_BEGIN, SECTION_END, markdown(data))
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
