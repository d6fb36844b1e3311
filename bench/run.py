"""Run every egress-auditor benchmark: `sudo make bench`, or `bench/run.py --quick`
for a short smoke run. Needs root (BPF, network namespaces). Writes
bench/results.json and docs/benchmarks.md (the quick mode writes under bench/build/)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.harness import (
    BENCH_DIR,
    BUILD_DIR,
    ROOT,
    STOPPED,
    Namespace,
    Spread,
    Stopped,
    Tracer,
    build_loadgen,
    cpu_seconds,
    namespace,
    other_tracers,
    programs_on_cgroup_root,
    rule_counts,
    run_client,
    running,
    server,
    status_mb,
    wait_for_flows,
)

AUDITOR_RUNNING = "egress-auditor is running"
PER_EVENT_RUNNING = "per-event reference is running"
SYNC_MARGIN_S = 1.5  # the auditor folds kernel counts at least once a second
NETFILTER_INPUTS = ("nflog", "nfqueue")
# Where the cost goes: the auditor without its UDP programs, and with DNS names (opt-in: their
# program runs for every packet the host receives). Key in details -> (what, options).
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


FULL = Config(
    "full",
    rounds=31,  # the median of 11 pairs moved by 2-3% between runs here, and rounds by ±15% some hours
    other_rounds=5,
    round_seconds=3.0,
    addrs=100,
    ports=100,
    flows_connects=1_000_000,
    rss_addrs=1000,
    rss_max_flows=131072,
    catch_up_s=240.0,
    conntrack_wait_s=15.0,
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
        for line in tracer.lines:
            if "input attached:" in line:
                self.attach = line.split("input attached:", 1)[1].strip()


def auditor_command() -> list[str]:
    found = shutil.which("egress-auditor")
    return [found] if found else [sys.executable, "-m", "egress_auditor"]


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
) -> dict[str, Any]:
    """Alternating rounds (ABBA) with and without a tracer; per pair, traced rate / untraced rate.
    `auditor`: the tracer is egress-auditor (it announces flows and reports lost events on stderr);
    `ebpf`: its start-up time and memory count in those figures;
    `conntrack`: its rules track connections, so each traced round starts from an empty table;
    `kind`: the load (TCP connects, or a UDP datagram per flow: see bench/loadgen.c)."""
    cfg = ctx.cfg
    flows = cfg.addrs * cfg.ports
    rates: dict[bool, list[float]] = {False: [], True: []}
    lost = 0
    crowded = 0  # rounds during which another process held BPF programs
    tracked: list[int] = []  # conntrack entries in the namespace after each traced round
    announced: list[int] = []  # flows the auditor announced after the untimed pass, per traced round

    def one_round(traced: bool, index: int) -> float:
        nonlocal lost, crowded
        if not traced:
            run_client(ctx.ns, ctx.loadgen, cfg.addrs, cfg.ports, count=flows, kind=kind)
            if auditor:
                # The traced rounds idle this long after their untimed pass (a sync): an idle vCPU is slow
                # to wake here, so the untraced timed part starts from the same idle.
                time.sleep(SYNC_MARGIN_S)
            crowded += other_tracers(set()) > 0 or programs_on_cgroup_root() > 0
            return run_client(ctx.ns, ctx.loadgen, cfg.addrs, cfg.ports, seconds=cfg.round_seconds, kind=kind).rate
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
            rate = run_client(ctx.ns, ctx.loadgen, cfg.addrs, cfg.ports, seconds=cfg.round_seconds, kind=kind).rate
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
    for index in range(rounds):
        order = (False, True) if index % 2 == 0 else (True, False)
        pair = {traced: one_round(traced, index) for traced in order}
        rates[False].append(pair[False])
        rates[True].append(pair[True])
        pair_ratios.append(pair[True] / pair[False])
        ctx.log(
            f"  round {index + 1}/{rounds}: {pair[False]:,.0f}/s untraced, {pair[True]:,.0f}/s traced, "
            f"ratio {pair_ratios[-1]:.3f}"
        )
    return {
        **Spread.of(pair_ratios).as_dict(),
        "rate_off_median": round(statistics.median(rates[False]), 1),
        "rate_on_median": round(statistics.median(rates[True]), 1),
        "rates_off": [round(r, 1) for r in rates[False]],
        "rates_on": [round(r, 1) for r in rates[True]],
        "round_seconds": cfg.round_seconds,
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
        run_client(ctx.ns, ctx.loadgen, cfg.rss_addrs, cfg.ports, count=flows)
        seen = wait_for_flows(tracer, set(), flows, cfg.catch_up_s)
        time.sleep(SYNC_MARGIN_S)
        rss_after = status_mb(tracer.pid)
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
        "events_lost": events_lost(stopped),
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
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    workdir = BUILD_DIR / f"run-{cfg.mode}"
    workdir.mkdir(parents=True, exist_ok=True)
    loadgen = build_loadgen()
    per_event = [sys.executable, str(BENCH_DIR / "per_event.py")]
    with (
        namespace() as ns,
        server(ns, loadgen, cfg.ports, lifetime_s=3600),
        server(ns, loadgen, cfg.ports, lifetime_s=3600, udp=True),
    ):
        ctx = Context(cfg, ns, loadgen, workdir, auditor_command(), log, [], [])
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
    startup = Spread.of(ctx.startups)
    ready = Spread.of(ctx.rss_ready)
    cpu_per_million = flows["cpu_s"] / (flows["connects"] / 1e6)
    return {
        "mode": cfg.mode,
        "started": started,
        "duration_s": round(time.monotonic() - began, 1),
        "machine": machine(ctx.attach),
        "connect_ratio_ebpf": ebpf["median"],
        "connect_ratio_per_event_reference": reference["median"],
        "flows_expected": flows["expected"],
        "flows_lost": flows["lost"],
        "userspace_cpu_s_per_million": round(cpu_per_million, 3),
        "startup_seconds": round(startup.median, 3),
        "rss_mb_ready": round(ready.median, 1),
        "rss_mb_100k_flows": rss["growth_mb"],
        **{f"connect_ratio_{name}": figures["median"] for name, figures in netfilter.items()},
        "connect_ratio_ebpf_udp": udp["udp-sendto"]["median"],
        "details": {
            "connect_ratio_ebpf": ebpf,
            "connect_ratio_per_event_reference": reference,
            **{f"connect_ratio_ebpf_{key}": figures for key, figures in breakdown.items()},
            "connect_ratio_ebpf_udp": udp["udp-sendto"],
            "connect_ratio_ebpf_udp_connect": udp["udp-connect"],
            "conntrack_max": conntrack_max,
            "flows": flows,
            "startup_seconds": startup.as_dict(3),
            "rss_mb_ready": ready.as_dict(1),
            "rss_mb_100k_flows": rss,
            **{f"connect_ratio_{name}": figures for name, figures in netfilter.items()},
        },
        "pending": report.PENDING,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run with tiny numbers")
    parser.add_argument("--json", type=Path, help="results file (default bench/results.json)")
    parser.add_argument("--markdown", type=Path, help="table (default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    # A quick run never overwrites the real figures.
    default_dir = BUILD_DIR if args.quick else None
    json_path = args.json or (default_dir / "results.json" if default_dir else BENCH_DIR / "results.json")
    md_path = args.markdown or (default_dir / "benchmarks.md" if default_dir else ROOT / "docs" / "benchmarks.md")
    results = run_all(cfg, log=lambda text: print(text, file=sys.stderr, flush=True))
    report.write_json(results, json_path)
    report.write_markdown(results, md_path)
    for key in report.KEYS:
        verdict = report.met(results, key)
        state = "" if verdict is None else (" (goal met)" if verdict else " (goal MISSED)")
        print(f"{key}: {results[key]}{state}", file=sys.stderr)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
