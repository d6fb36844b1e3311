"""What builds of the connect hook cost: `sudo .venv/bin/python bench/connect_variants.py [VARIANT ...]`.

The connect4 program of the eBPF input, compiled from bpf/ (or --src) as the
auditor compiles it, attached alone at the cgroup v2 root, against no program
and an empty one: connect rate and the load generator's CPU per connect, the
states alternating round by round in one session (this machine's noise is a
few percent from second to second). A VARIANT is NAME=FLAG,FLAG,...: the same
build with extra compiler flags (-DNAME for a scratch #ifdef in the source;
-UEA_COUNT_LINES for the flow map alone; -UEA_TASK_COMM for names and uids
read by the helpers). As the auditor's sync would, every
flow gets a count line slot once the map is filled.
The load is bench/run.py's: TCP connects over --flows flows in turn. Only the
connect program runs: user space, the lineage and the other hooks are not
loaded. With --runtime, also each build's run time per connect as the kernel
times it (kernel.bpf_stats_enabled, on for the run: it adds its own clock
reads, the same to every build): far less noisy than the connect rate, which
moves a few percent from second to second here, but blind to what a program
costs the connect path around it. The rates of a --runtime run are not the
bench's: those clock reads wait for the program's loads, so a cache miss
costs its whole latency there, where without them it overlaps with the
connect's own work. Prints a table; writes nothing. Needs root."""

from __future__ import annotations

import argparse
import os
import statistics
from contextlib import nullcontext
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: bench/ is sys.path[0], the project is not (bench/checkout.py)
    import checkout  # noqa: F401

from bench.harness import ROOT, Spread, bpf_programs, bpf_stats, build_loadgen, namespace, run_client, server

PORTS = 100
MAX_FLOWS = 65536  # the eBPF input's default
EMPTY = b"int connect4(struct bpf_sock_addr *ctx) { return 1; }"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """NAME=FLAG,FLAG → (NAME, [FLAG, FLAG]); a bare NAME is the build as is."""
    name, _, flags = text.partition("=")
    if not name or name in ("off", "empty"):
        raise SystemExit(f"connect_variants: bad variant {text!r} (NAME=FLAG,...; off and empty are taken)")
    return name, [flag for flag in flags.split(",") if flag]


def load(src: Path, flags: list[str]) -> tuple[Any, Any]:
    """The BPF object and its connect4 function, built as the auditor builds it by default, plus flags."""
    from bcc import BPF, BPFAttachType

    from egress_auditor.inputs.ebpf import count_line_flags, count_lines_for, identity_flags, plan_attach, program_text

    plan = plan_attach("auto", "auto")
    if plan.tcp_hook != "cgroup":
        raise SystemExit(f"connect_variants: the auditor would not use the cgroup connect hook here ({plan.reason})")
    cflags = [f"-I{src}", *plan.cflags(), *identity_flags()]  # the helpers where the auditor falls back to them
    lines = count_lines_for("auto", MAX_FLOWS, plan.buffer)
    if lines:
        cflags += count_line_flags(lines)[1]
    bpf = BPF(text=program_text(plan.pieces(), src), cflags=[*cflags, *flags])
    try:
        from egress_auditor.inputs.ebpf.generations import FlowGenerations

        FlowGenerations(bpf)  # the programs count in `flows`, as the auditor's do until its first flip
    except KeyError:  # sources from before the generations (--src) have no flow_gens
        pass
    return bpf, bpf.load_func(b"connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT)


def claim_slots(bpf: Any) -> Any:
    """As the auditor's sync does: a count line slot for each flow in the map (None without count lines)."""
    from egress_auditor.inputs.ebpf.count_lines import CountLines

    try:
        table = bpf["count_lines"]
    except KeyError:  # built without count lines
        return None
    lines = CountLines(table.map_fd, len(table))
    for key, value in bpf["flows"].items():
        lines.claim(value.fp, value.fp2, bytes(key))
    return lines


def prog_id(fd: int) -> int:
    """The kernel's id of the program behind a file descriptor of this process."""
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise RuntimeError(f"fd {fd} is not a BPF program")


def run_stats(prog: int) -> tuple[int, int]:
    """(run time ns, runs) the kernel counted for a program while bpf_stats were on."""
    info = bpf_programs().get(prog, {})
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="NAME=FLAG,FLAG: a build with extra compiler flags")
    parser.add_argument("--src", type=Path, default=ROOT / "bpf", help="the BPF sources to build (default bpf/)")
    parser.add_argument("--flows", type=int, default=10_000, help="distinct flows in turn, a multiple of 100")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed client run per state and round")
    parser.add_argument("--runtime", action="store_true", help="also each build's run time per connect (bpf_stats)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/connect_variants.py needs root (BPF programs, network namespaces)")
    if args.flows < PORTS or args.flows % PORTS:
        raise SystemExit(f"connect_variants: --flows must be a multiple of {PORTS}")
    from bcc import BPF, BPFAttachType

    from egress_auditor.host import facts

    root = facts.cgroup2_root()
    if root is None:
        raise SystemExit("connect_variants: no cgroup v2 mount")
    builds: dict[str, tuple[Any, Any]] = {}
    empty = BPF(text=EMPTY)
    kind = BPFAttachType.CGROUP_INET4_CONNECT
    builds["empty"] = (empty, empty.load_func(b"connect4", BPF.CGROUP_SOCK_ADDR, attach_type=kind))
    builds["ours"] = load(args.src, [])
    for text in args.variants:
        name, flags = parse_variant(text)
        builds[name] = load(args.src, flags)
    states = ["off", *builds]
    addrs = args.flows // PORTS
    loadgen = build_loadgen()
    rate: dict[str, list[float]] = {state: [] for state in states}
    cpu_ns: dict[str, list[float]] = {state: [] for state in states}
    run_ns: dict[str, list[float]] = {state: [] for state in states if state != "off"}
    cgroup = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    mapped: list[Any] = []  # count lines mapped here, closed before their maps go
    try:
        timed = bpf_stats() if args.runtime else nullcontext()
        with namespace() as ns, server(ns, loadgen, PORTS, lifetime_s=3600), timed:
            for bpf, fn in builds.values():  # fill each build's flow map once, then claim as sync would
                BPF.attach_func(fn, cgroup, kind, 2)
                try:
                    run_client(ns, loadgen, addrs, PORTS, count=args.flows)
                finally:
                    BPF.detach_func(fn, cgroup, kind)
                claimed = claim_slots(bpf)
                if claimed is not None:
                    mapped.append(claimed)
            for n in range(args.rounds):
                for state in states[n % len(states) :] + states[: n % len(states)]:  # each state leads in turn
                    fn = builds[state][1] if state != "off" else None
                    if fn is not None:
                        BPF.attach_func(fn, cgroup, kind, 2)
                    try:
                        run_client(ns, loadgen, addrs, PORTS, count=min(args.flows, 5000))  # warm up
                        before = run_stats(prog_id(fn.fd)) if args.runtime and fn is not None else (0, 0)
                        result = run_client(ns, loadgen, addrs, PORTS, seconds=args.seconds)
                        if args.runtime and fn is not None:
                            after = run_stats(prog_id(fn.fd))
                            run_ns[state].append((after[0] - before[0]) / max(1, after[1] - before[1]))
                    finally:
                        if fn is not None:
                            BPF.detach_func(fn, cgroup, kind)
                    rate[state].append(result.rate)
                    cpu_ns[state].append(result.cpu_seconds / result.timed_connects * 1e9)
                print(f"round {n + 1}/{args.rounds}: " + ", ".join(f"{s} {rate[s][-1]:.0f}/s" for s in states))
    finally:
        os.close(cgroup)
        for lines in mapped:
            lines.close()
        for bpf, _fn in builds.values():
            bpf.cleanup()
    summary: dict[str, Any] = {}
    runtime_head = "   program run time per connect (median, IQR)" if args.runtime else ""
    if args.runtime:
        print("\n(rates under kernel.bpf_stats_enabled: a program's cache misses weigh more than in the bench)")
    print(f"\n{'state':12s} {'rate / off (median, IQR)':28s} client CPU per connect - off (median){runtime_head}")
    for state in states:
        ratio = Spread.of([on / off for on, off in zip(rate[state], rate["off"], strict=True)])
        extra = statistics.median(on - off for on, off in zip(cpu_ns[state], cpu_ns["off"], strict=True))
        summary[state] = {"ratio": ratio.as_dict(), "cpu_ns_per_connect_extra": round(extra)}
        line = f"{state:12s} {ratio.median:.3f} ({ratio.q1:.3f}-{ratio.q3:.3f}){'':12s} {extra:+.0f} ns"
        if args.runtime and run_ns.get(state):
            run = Spread.of(run_ns[state])
            summary[state]["run_ns_per_connect"] = run.as_dict(1)
            line += f"{'':30s} {run.median:.0f} ns ({run.q1:.0f}-{run.q3:.0f})"
        print(line)
    return summary


if __name__ == "__main__":
    main()
