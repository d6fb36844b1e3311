"""Run every egress-auditor benchmark: `sudo make bench`, or `bench/run.py --quick`
for a short smoke run. Needs root (BPF, network namespaces). Writes
bench/results.json and docs/benchmarks.md (the quick mode writes under bench/build/).
`bench/run.py --render` writes docs/benchmarks.md again from bench/results.json as
recorded, running nothing."""

from __future__ import annotations

import argparse
import compileall
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: bench/ is sys.path[0], the project is not (bench/checkout.py)
    import checkout  # noqa: F401

from bench import report, soak
from bench.harness import (
    AUDITOR_RUNNING,
    BENCH_DIR,
    BUILD_DIR,
    ROOT,
    STOPPED,
    SYNC_MARGIN_S,
    Namespace,
    Spread,
    Stopped,
    Tracer,
    auditor_command,
    bootstrap_ci,
    bpf_programs,
    bpf_stats,
    build_loadgen,
    cpu_seconds,
    namespace,
    other_tracers,
    program_ids,
    programs_on_cgroup_root,
    rule_counts,
    run_client,
    running,
    server,
    status_mb,
    wait_for_flows,
)

BCC_FLOOR_RUNNING = "bcc floor is running"  # bench/bcc_floor.py
PER_EVENT_RUNNING = "per-event reference is running"
NETFILTER_INPUTS = ("nflog", "nfqueue")
# Where the cost goes: the auditor without its UDP and DNS programs, and with DNS names required
# (their program runs for every packet the host receives). Key in details -> (what, options).
BREAKDOWNS = {
    "tcp_only": ("tracing TCP only", ("-I", "ebpf:udp:off", "-I", "ebpf:dns:off")),
    "dns_names": ("with DNS names", ("-I", "ebpf:dns:on")),
}
UDP_LOADS = ("udp-sendto", "udp-connect")  # a datagram per flow: sendto(), or connect()+send() on a new socket


@dataclass(frozen=True)
class Config:
    mode: str
    rounds: int  # rounds without and as many with the auditor (-i ebpf, the goal's figure)
    other_rounds: int  # the same for the other tracers and breakdowns
    round_seconds: float
    addrs: int  # flows = addrs x ports for the ratios and the flow check
    ports: int
    flows_connects: int  # connects of the flow check
    rss_addrs: int  # flows of the memory figure = rss_addrs x ports
    rss_max_flows: int
    catch_up_s: float  # longest wait for the auditor to announce every flow
    conntrack_wait_s: float  # longest wait for the namespace's conntrack table to empty before a netfilter round
    cost_rounds: int  # timed loads while the kernel times our programs and the empty one
    cost_seconds: float
    startup_rounds: int  # starts of the auditor and of the BCC floor, alternating
    latency_connects: int  # timed connect() calls per round of the nfqueue ratio, with and without
    soak: soak.SoakConfig


FULL = Config(
    "full",
    rounds=21,  # throughput is reported, not a goal: CPU time and run time per call resolve the cost
    other_rounds=5,
    round_seconds=3.0,
    addrs=100,
    ports=100,
    flows_connects=1_000_000,
    rss_addrs=1000,
    rss_max_flows=131072,
    catch_up_s=240.0,
    conntrack_wait_s=15.0,
    cost_rounds=9,
    cost_seconds=2.0,
    startup_rounds=11,
    latency_connects=2000,
    soak=soak.FULL,
)
QUICK = Config(
    "quick",
    rounds=1,
    other_rounds=1,
    round_seconds=0.5,
    addrs=10,
    ports=10,
    flows_connects=20_000,
    rss_addrs=50,
    rss_max_flows=4096,
    catch_up_s=30.0,
    conntrack_wait_s=0.0,
    cost_rounds=1,
    cost_seconds=0.3,
    startup_rounds=1,
    latency_connects=100,
    soak=soak.QUICK,
)


@dataclass
class Context:
    cfg: Config
    ns: Namespace
    loadgen: Path
    workdir: Path
    auditor: list[str]
    log: Callable[[str], None]
    startups: list[float]
    rss_ready: list[float]
    anon_ready: list[float]
    attach: str = "unknown"

    def auditor_tracer(self, label: str, *extra: str) -> Tracer:
        argv = [*self.auditor, "trace", "-i", "ebpf", "--no-live", *extra]
        return Tracer(argv, AUDITOR_RUNNING, self.workdir, label)

    def netfilter_tracer(self, name: str, label: str) -> Tracer:
        """An nflog/nfqueue auditor inside the namespace: its rules go to the namespace's firewall only."""
        argv = self.ns.cmd([*self.auditor, "trace", "-i", name, "-I", f"{name}:setup:auto", "--no-live"])
        return Tracer(argv, AUDITOR_RUNNING, self.workdir, label)

    def started(self, tracer: Tracer) -> None:
        """Record the figures every auditor start gives: start-up time, ready RSS, attach path."""
        self.startups.append(tracer.startup_s)
        self.rss_ready.append(status_mb(tracer.pid))
        self.anon_ready.append(status_mb(tracer.pid, "RssAnon"))
        for line in tracer.lines:
            if "input attached:" in line:
                self.attach = line.split("input attached:", 1)[1].strip()


def events_lost(stopped: Stopped) -> int:
    match = STOPPED.search(stopped.stderr)
    return int(match.group(3)) if match else 0


# -- benchmarks ----------------------------------------------------------------------


def ratio(
    ctx: Context,
    make_tracer: Callable[[int], Tracer],
    auditor: bool,
    ebpf: bool = False,
    conntrack: bool = False,
    rounds: int | None = None,
    kind: str = "client",
    latency: int = 0,
) -> dict[str, Any]:
    """Alternating rounds (ABBA) with and without a tracer; per pair, traced rate / untraced rate.
    `auditor`: the tracer is egress-auditor (it announces flows and reports lost events on stderr);
    `ebpf`: its start-up time and memory count in those figures;
    `conntrack`: its rules track connections, so each traced round starts from an empty table;
    `kind`: the load (TCP connects, or a UDP datagram per flow: see bench/loadgen.c);
    `latency`: after each round's timed part, this many connect() calls timed one by one.
    Each timed part also gives the client's own CPU time per connect (rusage), per state."""
    cfg = ctx.cfg
    flows = cfg.addrs * cfg.ports
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu_ns: dict[bool, list[float]] = {False: [], True: []}  # the client's CPU per timed connect
    p50_us: dict[bool, list[float]] = {False: [], True: []}
    p99_us: dict[bool, list[float]] = {False: [], True: []}
    lost = 0
    crowded = 0  # rounds during which another process held BPF programs
    tracked: list[int] = []  # conntrack entries in the namespace after each traced round
    announced: list[int] = []  # flows the auditor announced after the untimed pass, per traced round

    def timed(traced: bool) -> float:
        load = run_client(ctx.ns, ctx.loadgen, cfg.addrs, cfg.ports, seconds=cfg.round_seconds, kind=kind)
        cpu_ns[traced].append(load.cpu_seconds / max(load.timed_connects, 1) * 1e9)
        if latency:
            timing = run_client(ctx.ns, ctx.loadgen, cfg.addrs, cfg.ports, count=latency, kind="latency")
            p50_us[traced].append(timing.p50_us)
            p99_us[traced].append(timing.p99_us)
        return load.rate

    def one_round(traced: bool, index: int) -> float:
        nonlocal lost, crowded
        if not traced:
            run_client(ctx.ns, ctx.loadgen, cfg.addrs, cfg.ports, count=flows, kind=kind)
            if auditor:
                # The traced rounds idle this long after their untimed pass (a sync): an idle vCPU is slow
                # to wake here, so the untraced timed part starts from the same idle.
                time.sleep(SYNC_MARGIN_S)
            crowded += other_tracers(set()) > 0 or programs_on_cgroup_root() > 0
            return timed(False)
        if conntrack:
            wait_for_empty_conntrack(ctx.ns, cfg.conntrack_wait_s)
        tracer = make_tracer(index)
        with running(tracer):
            if ebpf:
                ctx.started(tracer)
            # An untimed pass makes every flow known first: the timed part is the steady state.
            run_client(ctx.ns, ctx.loadgen, cfg.addrs, cfg.ports, count=flows, kind=kind)
            if auditor:
                announced.append(len(wait_for_flows(tracer, set(), flows, cfg.catch_up_s)))
                # The first sync once the flows are known gives them count line slots: then it is steady.
                time.sleep(SYNC_MARGIN_S)
            crowded += other_tracers({tracer.pid}) > 0
            rate = timed(True)
            if conntrack:
                tracked.append(conntrack_count(ctx.ns))
            stopped = tracer.stop()
        if auditor:
            lost += events_lost(stopped)
            if stopped.returncode != 0:
                raise RuntimeError(f"auditor exited with {stopped.returncode}: {stopped.stderr[-2000:]}")
        else:
            lost += json.loads(stopped.stdout)["lost"]
        return rate

    pair_ratios = []
    rounds = rounds or cfg.rounds
    cpu_overheads = []
    for index in range(rounds):
        order = (False, True) if index % 2 == 0 else (True, False)
        pair = {traced: one_round(traced, index) for traced in order}
        rates[False].append(pair[False])
        rates[True].append(pair[True])
        pair_ratios.append(pair[True] / pair[False])
        cpu_overheads.append(cpu_ns[True][-1] / cpu_ns[False][-1] - 1)
        ctx.log(
            f"  round {index + 1}/{rounds}: {pair[False]:,.0f}/s untraced, {pair[True]:,.0f}/s traced, "
            f"ratio {pair_ratios[-1]:.3f}, client CPU {cpu_overheads[-1]:+.1%}"
        )
    ci_low, ci_high = bootstrap_ci(cpu_overheads)
    return {
        **Spread.of(pair_ratios).as_dict(),
        "rate_off_median": round(statistics.median(rates[False]), 1),
        "rate_on_median": round(statistics.median(rates[True]), 1),
        "rates_off": [round(r, 1) for r in rates[False]],
        "rates_on": [round(r, 1) for r in rates[True]],
        "round_seconds": cfg.round_seconds,
        "client_cpu_ns_off_median": round(statistics.median(cpu_ns[False]), 1),
        "client_cpu_ns_on_median": round(statistics.median(cpu_ns[True]), 1),
        "client_cpu_overhead": {
            **Spread.of(cpu_overheads).as_dict(),
            "ci95_low": round(ci_low, 4),
            "ci95_high": round(ci_high, 4),
            "pairs": [round(v, 4) for v in cpu_overheads],
        },
        **(
            {
                "connect_latency_us": {
                    state: {
                        "p50_median": round(statistics.median(p50_us[traced]), 1),
                        "p99_median": round(statistics.median(p99_us[traced]), 1),
                        "p99_rounds": p99_us[traced],
                    }
                    for state, traced in (("untraced", False), ("traced", True))
                },
                "latency_connects": latency,
            }
            if latency
            else {}
        ),
        "flows": flows,
        "addresses": cfg.addrs,
        "ports": cfg.ports,
        "events_lost": lost,
        "rounds_with_other_bpf_users": crowded,
        **({"conntrack_entries_max": max(tracked)} if tracked else {}),
        **({"flows_announced_min": min(announced)} if announced else {}),
    }


def conntrack_count(ns: Namespace) -> int:
    out = subprocess.run(ns.cmd(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]), capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def wait_for_empty_conntrack(ns: Namespace, timeout_s: float) -> None:
    """The last traced round's entries (10 s for a reset connection) would fill the table: wait them out."""
    deadline = time.monotonic() + timeout_s
    while conntrack_count(ns) > 100 and time.monotonic() < deadline:
        time.sleep(0.5)


def flow_check(ctx: Context) -> dict[str, Any]:
    """Many connects over every flow with the auditor running: each flow present, each count exact."""
    cfg = ctx.cfg
    flows = cfg.addrs * cfg.ports
    tracer = ctx.auditor_tracer("flows", "-O", "iptables:verbose:1")
    with running(tracer):
        ctx.started(tracer)
        cpu_ready = cpu_seconds(tracer.pid)
        began = time.monotonic()
        load = run_client(
            ctx.ns, ctx.loadgen, cfg.addrs, cfg.ports, count=cfg.flows_connects, flows_out=ctx.workdir / "flows.txt"
        )
        load_seconds = time.monotonic() - began
        wait_for_flows(tracer, set(), flows, cfg.catch_up_s)
        time.sleep(SYNC_MARGIN_S)
        cpu_s = cpu_seconds(tracer.pid) - cpu_ready
        stopped = tracer.stop()
    counts = rule_counts(stopped.stdout)
    lost = [f for f in load.flows if f not in counts]
    wrong = [f for f in load.flows if f in counts and counts[f] != load.flows[f]]
    if wrong:
        ctx.log(f"  wrong counts, e.g. {wrong[:3]}: " + ", ".join(f"{counts[f]} != {load.flows[f]}" for f in wrong[:3]))
    return {
        "expected": len(load.flows),
        "lost": len(lost),
        "count_mismatches": len(wrong),
        "unexpected": len([f for f in counts if f not in load.flows]),
        "connects": load.connects,
        "client_failures": load.failures,
        "client_errors": load.errors,
        "cpu_s": round(cpu_s, 3),
        "load_seconds": round(load_seconds, 2),
        "events_lost": events_lost(stopped),
        "exit_status": stopped.returncode,
    }


def memory(ctx: Context) -> dict[str, Any]:
    """Resident memory growth from ready to holding rss_addrs x ports flows."""
    cfg = ctx.cfg
    flows = cfg.rss_addrs * cfg.ports
    tracer = ctx.auditor_tracer("memory", "-I", f"ebpf:max_flows:{cfg.rss_max_flows}")
    with running(tracer):
        ctx.started(tracer)
        rss_ready = status_mb(tracer.pid)
        anon_ready = status_mb(tracer.pid, "RssAnon")
        run_client(ctx.ns, ctx.loadgen, cfg.rss_addrs, cfg.ports, count=flows)
        seen = wait_for_flows(tracer, set(), flows, cfg.catch_up_s)
        time.sleep(SYNC_MARGIN_S)
        rss_after = status_mb(tracer.pid)
        anon_after = status_mb(tracer.pid, "RssAnon")
        hwm = status_mb(tracer.pid, "VmHWM")
        stopped = tracer.stop()
    return {
        "flows_made": flows,
        "flows_seen": len(seen),
        "max_flows": cfg.rss_max_flows,
        "rss_ready_mb": round(rss_ready, 1),
        "rss_after_mb": round(rss_after, 1),
        "hwm_mb": round(hwm, 1),
        "growth_mb": round(rss_after - rss_ready, 1),
        "anon_ready_mb": round(anon_ready, 1),
        "anon_after_mb": round(anon_after, 1),
        "events_lost": events_lost(stopped),
    }


EMPTY_CONNECT4 = b"int floor_connect4(struct bpf_sock_addr *ctx) { return 1; }"
# The process lineage's programs (bpf/process.bpf.c) run on fork, exec and exit, not on a connect.
LINEAGE_PROGRAMS = ("tracepoint__sched__", "tracepoint__task__", "tracepoint__syscalls__sys_enter_exec")


@contextmanager
def empty_connect4() -> Iterator[int]:
    """An empty program on the connect4 hook at the cgroup v2 root, beside the auditor's; yields its id."""
    from bcc import BPF, BPFAttachType

    from bench.connect_variants import prog_id
    from egress_auditor.host import facts

    root = facts.cgroup2_root()
    if root is None:
        raise SystemExit("bench: no cgroup v2 mount")
    kind = BPFAttachType.CGROUP_INET4_CONNECT
    bpf = BPF(text=EMPTY_CONNECT4)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fn = bpf.load_func(b"floor_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=kind)
        BPF.attach_func(fn, fd, kind, 2)  # BPF_F_ALLOW_MULTI: beside the auditor's link
        try:
            yield prog_id(fn.fd)
        finally:
            BPF.detach_func(fn, fd, kind)
    finally:
        os.close(fd)
        bpf.cleanup()


def spent(before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]], prog: int) -> tuple[int, int]:
    """(run time ns, runs) of a program between two bpf_programs() snapshots."""
    old, new = before.get(prog, {}), after.get(prog, {})
    return new.get("run_time_ns", 0) - old.get("run_time_ns", 0), new.get("run_cnt", 0) - old.get("run_cnt", 0)


def program_cost(ctx: Context) -> dict[str, Any]:
    """The kernel's run time of the auditor's programs per connect, beside an empty program on
    the connect4 hook run by the same connects (kernel.bpf_stats_enabled on for each timed load)."""
    cfg = ctx.cfg
    flows = cfg.addrs * cfg.ports
    tracer = ctx.auditor_tracer("cost")
    ours_ns: list[float] = []
    floor_ns: list[float] = []
    per_program: dict[str, list[float]] = {}
    with running(tracer), empty_connect4() as floor_id:
        ours = program_ids(tracer.pid)
        run_client(ctx.ns, ctx.loadgen, cfg.addrs, cfg.ports, count=flows)
        wait_for_flows(tracer, set(), flows, cfg.catch_up_s)
        time.sleep(SYNC_MARGIN_S)  # the steady state: known flows count in their count lines
        for index in range(cfg.cost_rounds):
            with bpf_stats():
                before = bpf_programs()
                load = run_client(ctx.ns, ctx.loadgen, cfg.addrs, cfg.ports, seconds=cfg.cost_seconds)
                after = bpf_programs()

            # Every IPv4 connect on the host runs the empty program once, other processes' too: its runs are
            # the connects our programs ran for.
            floor_total, floor_runs = spent(before, after, floor_id)
            connects = max(floor_runs, 1)
            total = 0
            for pid in sorted(ours & set(after)):
                ns, runs = spent(before, after, pid)
                name = after[pid].get("name", "?")
                if not runs or name.startswith(LINEAGE_PROGRAMS):
                    continue
                total += ns
                per_program.setdefault(f"{name} ({after[pid]['type']})", []).append(ns / connects)
            ours_ns.append(total / connects)
            floor_ns.append(floor_total / max(floor_runs, 1))
            ctx.log(
                f"  round {index + 1}/{cfg.cost_rounds}: ours {ours_ns[-1]:.0f} ns per connect, "
                f"empty program {floor_ns[-1]:.0f} ns per run ({floor_runs:,} runs, {load.timed_connects:,} connects)"
            )
        tracer.stop()
    return {
        "ours_ns_per_connect": Spread.of(ours_ns).as_dict(1),
        "floor_ns_per_run": Spread.of(floor_ns).as_dict(1),
        "ratios": [round(o / f, 3) for o, f in zip(ours_ns, floor_ns, strict=True) if f > 0],
        "programs_ns_per_connect": {name: round(statistics.median(v), 1) for name, v in per_program.items()},
        "seconds_per_round": cfg.cost_seconds,
    }


def startup(ctx: Context) -> dict[str, Any]:
    """Start-up and private memory of the auditor beside BCC's floor (bench/bcc_floor.py), alternating."""
    cfg = ctx.cfg
    floor_argv = [sys.executable, str(BENCH_DIR / "bcc_floor.py")]
    times: dict[str, list[float]] = {"auditor": [], "floor": []}
    anon: dict[str, list[float]] = {"auditor": [], "floor": [], "floor_untrimmed": []}
    for index in range(cfg.startup_rounds):
        order = ("floor", "auditor") if index % 2 == 0 else ("auditor", "floor")
        for who in order:
            if who == "auditor":
                tracer = ctx.auditor_tracer(f"startup-{index}")
            else:
                tracer = Tracer(floor_argv, BCC_FLOOR_RUNNING, ctx.workdir, f"bcc-floor-{index}")
            with running(tracer):
                if who == "auditor":
                    ctx.started(tracer)
                times[who].append(tracer.startup_s)
                time.sleep(SYNC_MARGIN_S)  # a running process: the auditor has synced once
                anon[who].append(status_mb(tracer.pid, "RssAnon"))
                stopped = tracer.stop()
            if who == "floor":
                match = re.search(r"untrimmed RssAnon ([\d.]+)", stopped.stderr)
                anon["floor_untrimmed"].append(float(match.group(1)) if match else 0.0)
        ctx.log(
            f"  round {index + 1}/{cfg.startup_rounds}: auditor {times['auditor'][-1]:.2f} s, "
            f"{anon['auditor'][-1]:.1f} MiB anon; floor {times['floor'][-1]:.2f} s, {anon['floor'][-1]:.1f} MiB anon"
        )
    return {
        "auditor_seconds": Spread.of(times["auditor"]).as_dict(3),
        "floor_seconds": Spread.of(times["floor"]).as_dict(3),
        "auditor_anon_mb": Spread.of(anon["auditor"]).as_dict(1),
        "floor_anon_mb": Spread.of(anon["floor"]).as_dict(1),
        "floor_anon_mb_untrimmed": Spread.of(anon["floor_untrimmed"]).as_dict(1),
    }


# -- the run ---------------------------------------------------------------------------


def machine(attach: str) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    try:
        import bcc  # the Debian package has no __version__ before 0.27

        bcc_version = getattr(bcc, "__version__", "installed")
    except ImportError:
        bcc_version = "missing"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "attach": attach,
        "python": platform.python_version(),
        "bcc": bcc_version,
    }


def run_all(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every benchmark of the mode; returns what results.json holds."""
    if os.geteuid() != 0:
        raise SystemExit("bench/run.py needs root (BPF programs, network namespaces): sudo make bench")
    began = time.monotonic()
    load_start = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    workdir = BUILD_DIR / f"run-{cfg.mode}"
    workdir.mkdir(parents=True, exist_ok=True)
    loadgen = build_loadgen()
    # Byte-compiled as an install leaves it: otherwise (an editable install, PYTHONDONTWRITEBYTECODE)
    # every start of the auditor would compile its own modules again.
    compileall.compile_dir(ROOT / "egress_auditor", quiet=1)
    per_event = [sys.executable, str(BENCH_DIR / "per_event.py")]
    with (
        namespace() as ns,
        server(ns, loadgen, cfg.ports, lifetime_s=3600),
        server(ns, loadgen, cfg.ports, lifetime_s=3600, udp=True),
    ):
        ctx = Context(cfg, ns, loadgen, workdir, auditor_command(), log, [], [], [])
        log(f"per-connect run time: the auditor's programs and an empty connect4 program ({cfg.cost_rounds} rounds)")
        cost = program_cost(ctx)
        log(f"start-up and private memory beside BCC's floor ({cfg.startup_rounds} rounds)")
        starts = startup(ctx)
        log(f"connect ratio, auditor ({cfg.rounds} rounds each)")
        ebpf = ratio(ctx, lambda i: ctx.auditor_tracer(f"ratio-{i}"), auditor=True, ebpf=True)
        breakdown = {}
        for key, (what, options) in BREAKDOWNS.items():
            log(f"connect ratio, auditor {what} ({' '.join(options)})")
            breakdown[key] = ratio(
                ctx,
                lambda i, k=key, o=options: ctx.auditor_tracer(f"{k}-{i}", *o),
                auditor=True,
                rounds=cfg.other_rounds,
            )
        udp = {}
        for kind in UDP_LOADS:
            log(f"datagram ratio, auditor, load {kind}")
            udp[kind] = ratio(
                ctx,
                lambda i, k=kind: ctx.auditor_tracer(f"{k}-{i}"),
                auditor=True,
                rounds=cfg.other_rounds,
                kind=kind,
            )
        log("connect ratio, per-event reference")
        reference = ratio(
            ctx,
            lambda i: Tracer(per_event, PER_EVENT_RUNNING, workdir, f"per-event-{i}"),
            auditor=False,
            rounds=cfg.other_rounds,
        )
        netfilter = {}
        for name in NETFILTER_INPUTS:
            log(f"connect ratio, auditor with -i {name}")
            netfilter[name] = ratio(
                ctx,
                lambda i, n=name: ctx.netfilter_tracer(n, f"{n}-{i}"),
                auditor=True,
                conntrack=True,
                rounds=cfg.other_rounds,
                latency=cfg.latency_connects if name == "nfqueue" else 0,
            )
        conntrack_max = int(
            subprocess.run(
                ns.cmd(["cat", "/proc/sys/net/netfilter/nf_conntrack_max"]), capture_output=True, text=True
            ).stdout.strip()
            or 0
        )
        log(f"flow check: {cfg.flows_connects:,} connects over {cfg.addrs * cfg.ports:,} flows")
        flows = flow_check(ctx)
        log(f"memory: {cfg.rss_addrs * cfg.ports:,} flows")
        rss = memory(ctx)
    soaked = run_soak(cfg, loadgen, log)
    ready = Spread.of(ctx.rss_ready)
    cpu_per_million = flows["cpu_s"] / (flows["connects"] / 1e6)
    nfqueue_latency = netfilter["nfqueue"]["connect_latency_us"]
    return {
        "mode": cfg.mode,
        "started": started,
        "duration_s": round(time.monotonic() - began, 1),
        "load_average": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "machine": machine(ctx.attach),
        "connect_prog_ns": cost["ours_ns_per_connect"]["median"],
        "connect_prog_floor_ns": cost["floor_ns_per_run"]["median"],
        "client_cpu_overhead_ci_high": ebpf["client_cpu_overhead"]["ci95_high"],
        "connect_ratio_ebpf": ebpf["median"],
        "connect_ratio_per_event_reference": reference["median"],
        "flows_expected": flows["expected"],
        "flows_lost": flows["lost"],
        "userspace_cpu_s_per_million": round(cpu_per_million, 3),
        "startup_seconds": starts["auditor_seconds"]["median"],
        "startup_bcc_floor_seconds": starts["floor_seconds"]["median"],
        "rss_anon_mb_ready": starts["auditor_anon_mb"]["median"],
        "rss_anon_mb_bcc_floor": starts["floor_anon_mb"]["median"],
        "rss_mb_ready": round(ready.median, 1),
        "rss_mb_100k_flows": rss["growth_mb"],
        **{f"connect_ratio_{name}": figures["median"] for name, figures in netfilter.items()},
        "nfqueue_connect_p99_ms": round(nfqueue_latency["traced"]["p99_median"] / 1000, 3),
        "nfqueue_connect_p99_ms_untraced": round(nfqueue_latency["untraced"]["p99_median"] / 1000, 3),
        "connect_ratio_ebpf_udp": udp["udp-sendto"]["median"],
        **soak_figures(soaked),
        "details": {
            "connect_prog_ns": {
                **cost["ours_ns_per_connect"],
                "programs": cost["programs_ns_per_connect"],
                "ratios_to_floor": cost["ratios"],
                "seconds_per_round": cost["seconds_per_round"],
            },
            "connect_prog_floor_ns": cost["floor_ns_per_run"],
            "client_cpu_overhead_ci_high": {
                **ebpf["client_cpu_overhead"],
                "client_cpu_ns_off_median": ebpf["client_cpu_ns_off_median"],
                "client_cpu_ns_on_median": ebpf["client_cpu_ns_on_median"],
            },
            "startup_seconds": starts["auditor_seconds"],
            "startup_bcc_floor_seconds": starts["floor_seconds"],
            "rss_anon_mb_ready": starts["auditor_anon_mb"],
            "rss_anon_mb_bcc_floor": {**starts["floor_anon_mb"], "untrimmed": starts["floor_anon_mb_untrimmed"]},
            "startup_all_starts": Spread.of(ctx.startups).as_dict(3),
            "rss_anon_mb_all_starts": Spread.of(ctx.anon_ready).as_dict(1),
            "connect_ratio_ebpf": ebpf,
            "connect_ratio_per_event_reference": reference,
            **{f"connect_ratio_ebpf_{key}": figures for key, figures in breakdown.items()},
            "connect_ratio_ebpf_udp": udp["udp-sendto"],
            "connect_ratio_ebpf_udp_connect": udp["udp-connect"],
            "conntrack_max": conntrack_max,
            "flows": flows,
            "rss_mb_ready": ready.as_dict(1),
            "rss_mb_100k_flows": rss,
            **{f"connect_ratio_{name}": figures for name, figures in netfilter.items()},
            "soak": soaked,
        },
        "pending": report.PENDING,
    }


def run_soak(cfg: Config, loadgen: Path, log: Callable[[str], None]) -> dict[str, Any]:
    flows = cfg.soak.bursts * cfg.soak.addrs * cfg.soak.ports
    log(f"soak: {flows:,} distinct flows in {cfg.soak.bursts} bursts")
    return soak.soak(cfg.soak, loadgen, BUILD_DIR / f"soak-{cfg.mode}", auditor_command(), log=log)


def soak_figures(soaked: dict[str, Any]) -> dict[str, Any]:
    return {"soak_flows": soaked["flows"], "soak_flows_lost": soaked["flows_lost"], "soak_rss_mb": soaked["rss_mb"]}


def only_stage(stage: str, cfg: Config, json_path: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """One stage alone (soak, memory), its figures put into an existing results file (the others kept)."""
    if os.geteuid() != 0:
        raise SystemExit("bench/run.py needs root (BPF programs, network namespaces): sudo make bench")
    if not json_path.exists():
        raise SystemExit(f"bench/run.py --only {stage}: no {json_path} to add to; run the whole bench first")
    results = json.loads(json_path.read_text())
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    loadgen = build_loadgen()
    if stage == "soak":
        soaked = run_soak(cfg, loadgen, log)
        results.update(soak_figures(soaked), soak_started=started)
        results["details"]["soak"] = soaked
        return results
    compileall.compile_dir(ROOT / "egress_auditor", quiet=1)
    workdir = BUILD_DIR / f"run-{cfg.mode}"
    workdir.mkdir(parents=True, exist_ok=True)
    with namespace() as ns, server(ns, loadgen, cfg.ports, lifetime_s=3600):
        ctx = Context(cfg, ns, loadgen, workdir, auditor_command(), log, [], [], [])
        log(f"memory: {cfg.rss_addrs * cfg.ports:,} flows")
        rss = memory(ctx)
    results.update(rss_mb_100k_flows=rss["growth_mb"], memory_started=started)
    results["details"]["rss_mb_100k_flows"] = rss
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run with tiny numbers")
    parser.add_argument("--json", type=Path, help="results file (default bench/results.json)")
    parser.add_argument("--markdown", type=Path, help="table (default docs/benchmarks.md)")
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument(
        "--only", choices=("soak", "memory"), help="run one stage alone; its figures join the results file"
    )
    stage.add_argument(
        "--render", action="store_true", help="only write the Markdown from the results file as recorded (runs nothing)"
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    # A quick run never overwrites the real figures.
    default_dir = BUILD_DIR if args.quick else None
    json_path = args.json or (default_dir / "results.json" if default_dir else BENCH_DIR / "results.json")
    md_path = args.markdown or (default_dir / "benchmarks.md" if default_dir else ROOT / "docs" / "benchmarks.md")
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.render:  # the figures stay as recorded: results.json is read, never written
        results = json.loads(json_path.read_text())
    else:
        results = only_stage(args.only, cfg, json_path, log) if args.only else run_all(cfg, log=log)
        report.write_json(results, json_path)
    report.write_markdown(results, md_path)
    for key in report.KEYS:
        verdict = report.met(results, key)
        state = "" if verdict is None else (" (goal met)" if verdict else " (goal MISSED)")
        print(f"{key}: {results[key]}{state}", file=sys.stderr)
    print(f"wrote {md_path}" if args.render else f"wrote {json_path} and {md_path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
