"""bench/results.json and the Markdown table of docs/benchmarks.md."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The figures, in the order the table shows them: first what this machine resolves (run time per
# call, CPU time, start-up, memory), then throughput, which it does not resolve to a few per cent.
KEYS = (
    "connect_prog_ns",
    "connect_prog_floor_ns",
    "client_cpu_overhead_ci_high",
    "connect_ratio_ebpf",
    "connect_ratio_per_event_reference",
    "flows_expected",
    "flows_lost",
    "userspace_cpu_s_per_million",
    "startup_seconds",
    "startup_bcc_floor_seconds",
    "rss_anon_mb_ready",
    "rss_anon_mb_bcc_floor",
    "rss_mb_ready",
    "rss_mb_100k_flows",
    "connect_ratio_nflog",
    "connect_ratio_nfqueue",
    "nfqueue_connect_p99_ms",
    "nfqueue_connect_p99_ms_untraced",
    "connect_ratio_ebpf_udp",
    "soak_flows",
    "soak_flows_lost",
    "soak_rss_mb",
)


@dataclass(frozen=True)
class Goal:
    text: str  # the goal as stated
    at_least: float | None = None
    at_most: float | None = None
    times: str | None = None  # the bound is at_most times this other figure of the run

    def met(self, value: float, results: dict[str, Any] | None = None) -> bool | None:
        if self.times is not None:
            assert self.at_most is not None and results is not None
            return value <= self.at_most * results[self.times]
        if self.at_least is not None:
            return value >= self.at_least
        if self.at_most is not None:
            return value <= self.at_most
        return None  # reported only


GOALS = {
    "connect_prog_ns": Goal("at most 1.5 x `connect_prog_floor_ns`", at_most=1.5, times="connect_prog_floor_ns"),
    "connect_prog_floor_ns": Goal("reported (the floor)"),
    "client_cpu_overhead_ci_high": Goal("at most 0.05", at_most=0.05),
    "connect_ratio_ebpf": Goal("reported (not resolved to a few per cent here)"),
    "connect_ratio_per_event_reference": Goal("reported (what in-kernel counting buys)"),
    "flows_expected": Goal("reported"),
    "flows_lost": Goal("0, and every flow's count exact", at_most=0),
    "userspace_cpu_s_per_million": Goal("reported; grows with flows, not connections"),
    "startup_seconds": Goal("at most 2 x `startup_bcc_floor_seconds`", at_most=2, times="startup_bcc_floor_seconds"),
    "startup_bcc_floor_seconds": Goal("reported (the floor)"),
    "rss_anon_mb_ready": Goal("at most 48", at_most=48),
    "rss_anon_mb_bcc_floor": Goal("reported (the floor)"),
    "rss_mb_ready": Goal("reported"),
    "rss_mb_100k_flows": Goal("at most 64", at_most=64),
    "connect_ratio_nflog": Goal("reported"),
    "connect_ratio_nfqueue": Goal("reported"),
    "nfqueue_connect_p99_ms": Goal("reported"),
    "nfqueue_connect_p99_ms_untraced": Goal("reported"),
    "connect_ratio_ebpf_udp": Goal("reported"),
    "soak_flows": Goal("at least 1,000,000", at_least=1_000_000),
    "soak_flows_lost": Goal("0, every count exact, no connect found the map full", at_most=0),
    "soak_rss_mb": Goal("reported"),
}

WHAT = {
    "connect_prog_ns": "run time (ns) of all the auditor's BPF programs per connect, as the kernel counts it "
    "(bpf_stats), defaults, steady state",
    "connect_prog_floor_ns": "run time (ns) per run of an empty program on the connect4 hook, run by the same connects",
    "client_cpu_overhead_ci_high": "upper bound of the 95% bootstrap interval of the client's CPU time per connect "
    "(rusage) with `trace -i ebpf` / without, minus 1 (median of pairs)",
    "connect_ratio_ebpf": "connects/s with `trace -i ebpf` running / without",
    "connect_ratio_per_event_reference": "the same for a tracer sending every connect to Python (bench/per_event.*)",
    "flows_expected": "distinct flows the load generator made",
    "flows_lost": "flows missing from the rules",
    "userspace_cpu_s_per_million": "CPU seconds (user+system) of the auditor per million connects",
    "startup_seconds": "from start to the running line (`trace -i ebpf`)",
    "startup_bcc_floor_seconds": "the same for a Python process that imports bcc and loads a one-line program "
    "(bench/bcc_floor.py), alternating with the auditor",
    "rss_anon_mb_ready": "private memory (RssAnon, MiB) of a running auditor, 1.5 s after its running line",
    "rss_anon_mb_bcc_floor": "the same for bench/bcc_floor.py, its freed heap returned (`malloc_trim`)",
    "rss_mb_ready": "resident memory (VmRSS, MiB, with the compiler's shared code) once running",
    "rss_mb_100k_flows": "growth of resident memory (MiB) from ready to holding 100,000 flows",
    "connect_ratio_nflog": "as `connect_ratio_ebpf`, with `trace -i nflog -I nflog:setup:auto` in the namespace",
    "connect_ratio_nfqueue": "as `connect_ratio_ebpf`, with `trace -i nfqueue -I nfqueue:setup:auto` in the namespace",
    "nfqueue_connect_p99_ms": "99th percentile of one connect() call (ms) with `trace -i nfqueue` in the namespace, "
    "median over rounds",
    "nfqueue_connect_p99_ms_untraced": "the same without it, in the same run",
    "connect_ratio_ebpf_udp": "datagrams/s with `trace -i ebpf` running / without, one `sendto()` per flow in turn",
    "soak_flows": "distinct flows of the soak (bench/soak.py), in bursts at full speed, default `max_flows`",
    "soak_flows_lost": "of those, flows held neither by their address nor by a network in the JSON capture",
    "soak_rss_mb": "resident memory (VmRSS, MiB) of the auditor at the end of the soak (bounded by `--flow-cap`)",
}

# Goals the harness does not measure yet (key: why).
PENDING: dict[str, str] = {}


def met(results: dict[str, Any], key: str) -> bool | None:
    """Whether a figure meets its goal; flows_lost also needs every count exact."""
    verdict = GOALS[key].met(results[key], results)
    if key == "flows_lost" and verdict is not None:
        verdict = verdict and results["details"]["flows"]["count_mismatches"] == 0
    if key == "soak_flows_lost" and verdict is not None:
        soak = results["details"]["soak"]
        verdict = verdict and soak["count_mismatches"] == 0 and soak["map_full"] == 0
    return verdict


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _spread(detail: dict[str, Any] | None) -> str:
    if not detail or "min" not in detail:
        return ""
    return (
        f"min {_fmt(detail['min'])}, max {_fmt(detail['max'])}, "
        f"IQR {_fmt(detail['q1'])}-{_fmt(detail['q3'])}, n={detail['n']}"
    )


def _rates(name: str, figures: dict[str, Any]) -> str:
    return (
        f"{name}: {figures['rate_off_median']:,.0f}/s untraced, {figures['rate_on_median']:,.0f}/s traced "
        f"({figures['events_lost']:,} events lost)"
    )


SECTION_BEGIN = "<!-- run:begin (bench/run.py) -->"
SECTION_END = "<!-- run:end -->"


def markdown(results: dict[str, Any]) -> str:
    """The section bench/run.py owns in docs/benchmarks.md (other benchmarks keep theirs)."""
    machine = results["machine"]
    details = results["details"]
    ratio = details["connect_ratio_ebpf"]
    tcp = details["connect_ratio_ebpf_tcp_only"]
    names = details.get("connect_ratio_ebpf_dns_names")  # runs older than this breakdown lack it
    conntrack_peak = max(
        (d.get("conntrack_entries_max", 0) for d in details.values() if isinstance(d, dict)), default=0
    )
    flows = details["flows"]
    rss = details["rss_mb_100k_flows"]
    cost = details["connect_prog_ns"]
    cpu = details["client_cpu_overhead_ci_high"]
    floor_anon = details["rss_anon_mb_bcc_floor"]
    latency = details["connect_ratio_nfqueue"]["connect_latency_us"]
    noisy = sum(d.get("rounds_with_other_bpf_users", 0) for d in details.values() if isinstance(d, dict))
    rounds = sum(2 * d["n"] for k, d in details.items() if k.startswith("connect_ratio_"))
    lines = [
        SECTION_BEGIN,
        "## Overhead, loss, CPU, start-up and memory",
        "",
        f"`sudo make bench` (`bench/run.py`, {results['mode']} mode, {results['duration_s']:.0f} s) on "
        f"{results['started']}; the figures are also in `bench/results.json`."
        + (
            f" Load average (1 min) {results['load_average']['start']:.2f} at the start, "
            f"{results['load_average']['end']:.2f} at the end, on {machine['cores']} cores shared with other work."
            if "load_average" in results
            else ""
        ),
        "",
        "Goals are set in figures this machine resolves, each beside its floor measured in the same run: the "
        "kernel's run time of our programs per connect beside an empty program's on the same hook, the "
        "client's CPU time per connect with and without the auditor, start-up and private memory beside a "
        "minimal BCC program's. Connect throughput stays reported beside the per-event reference, not as a "
        "goal: its rounds swing by 15% or more from one to the next here.",
        "",
        "| machine | |",
        "| --- | --- |",
        f"| cores | {machine['cores']} ({machine['cpu']}) |",
        f"| memory | {machine['memory_gb']:.1f} GB |",
        f"| kernel | {machine['kernel']} |",
        f"| attach path | {machine['attach']} |",
        f"| Python, BCC | {machine['python']}, {machine['bcc']} |",
        "",
        "| key | what | value | spread | goal | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in KEYS:
        verdict = met(results, key)
        mark = "reported" if verdict is None else ("yes" if verdict else "**no**")
        lines.append(
            f"| `{key}` | {WHAT[key]} | {_fmt(results[key])} | {_spread(details.get(key))} "
            f"| {GOALS[key].text} | {mark} |"
        )
    lines += [
        "",
        "How each figure is made:",
        "",
        f"- Per connect, in the kernel (`connect_prog_ns`, `connect_prog_floor_ns`): the auditor running with its "
        "defaults after an untimed pass over every flow and one sync, and an empty program attached beside it on "
        f"the connect4 hook at the cgroup v2 root; {cost['n']} timed loads of {cost['seconds_per_round']:g} s with "
        "`kernel.bpf_stats_enabled=1` (which adds its own clock reads, the same to both). The auditor's programs "
        "are those whose fds it holds, but for the process lineage's (they run on fork, exec and exit); their "
        "run time over the load / the empty program's runs (every IPv4 connect on the host, the load's and any "
        "other process's), against the empty "
        "program's run time / its runs; medians over the loads. Per program (ns per connect): "
        + ", ".join(f"{name} {ns:.0f}" for name, ns in cost["programs"].items())
        + f"; ours / floor per load: {', '.join(f'{r:.1f}' for r in cost['ratios_to_floor'])}. The floor is the "
        "least any program on that hook costs; what the hook costs the connect beyond the programs' run time "
        "(no counter shows it) is in the client's CPU below.",
        f"- Client CPU (`client_cpu_overhead_ci_high`): in every pair of the `connect_ratio_ebpf` rounds, the load "
        "generator's own CPU time (getrusage, user + system: the connect hook runs in its system call) per timed "
        f"connect, with / without the auditor, minus 1: median {cpu['median']:+.2%} over {cpu['n']} pairs "
        f"({cpu['client_cpu_ns_off_median']:,.0f} ns untraced, {cpu['client_cpu_ns_on_median']:,.0f} ns traced), "
        f"95% bootstrap interval of the median {cpu['ci95_low']:+.2%} to {cpu['ci95_high']:+.2%} (10,000 "
        "resamples of the pairs).",
        "- Start-up and private memory: the auditor (`trace -i ebpf --no-live`) and `bench/bcc_floor.py` started "
        f"in turn, {details['startup_seconds']['n']} times each (order alternating); start-up is from the process's "
        "start to its running line; RssAnon is read 1.5 s later (the auditor has synced once). The floor returns "
        "its freed heap as the auditor does (`malloc_trim`); before that it held "
        f"{_fmt(floor_anon['untrimmed']['median'])} MiB. `rss_mb_ready` (VmRSS) also counts the compiler's code "
        "mapped from disk, which is shared and can be evicted.",
        f"- nfqueue latency: after the timed part of each `connect_ratio_nfqueue` round, "
        f"{details['connect_ratio_nfqueue']['latency_connects']:,} connect() calls timed one by one over the same "
        f"flows: p50 {latency['traced']['p50_median']:,.0f} us with the auditor, "
        f"{latency['untraced']['p50_median']:,.0f} us without (medians over rounds); every new connection's "
        "first packet waits in the queue until Python answers.",
        f"- Load: `bench/loadgen.c` (built with the machine's gcc into `bench/build/`) in a network namespace made "
        f"for the run: a client connecting and closing (SO_LINGER 0) one connection at a time, round-robin over "
        f"{ratio['flows']:,} flows ({ratio['addresses']} loopback addresses 127.100.x.y x {ratio['ports']} ports), "
        "and an epoll server accepting and closing. The UDP loads send one datagram per flow in turn over the "
        "same flows to a server reading them: `sendto()` on one socket (`connect_ratio_ebpf_udp`), or a new "
        "socket that `connect()`s, `send()`s and closes (`ebpf_udp_connect` below). The eBPF auditor "
        "runs in the host's namespace (it traces every "
        "namespace); the nflog and nfqueue auditors run inside the benchmark's namespace, so their rules never "
        "touch the host's firewall.",
        f"- Ratios: {ratio['n']} rounds without and {ratio['n']} with the tracer, alternating (ABBA), "
        f"{ratio['round_seconds']:g} s each after an untimed pass over every flow and, for the auditor, one sync "
        "(which gives the known flows their count line slots), so the timed part is the steady state; rounds "
        "without the auditor idle as long before their timed part, as an idle vCPU is slow to wake here; the "
        "figure is the median of the per-pair ratios. Medians: "
        + "; ".join(
            _rates(k.removeprefix("connect_ratio_"), d) for k, d in details.items() if k.startswith("connect_ratio_")
        )
        + ".",
        f"- Where the eBPF input's cost goes: tracing TCP only (`-I ebpf:udp:off -I ebpf:dns:off`) gives "
        f"{_fmt(tcp['median'])} ({_spread(tcp)}) against {_fmt(ratio['median'])} with the defaults (their UDP "
        "programs, hooks that run per connect, send or UDP read, and the DNS names' ingress program)"
        + (
            "; TCP only runs a subset of the defaults' programs, so its lower median here is this VM's noise"
            if tcp["median"] < ratio["median"]
            else ""
        )
        + (
            f". With DNS names required (`-I ebpf:dns:on`; the default, `dns:auto`, loads them wherever the "
            f"kernel allows): {_fmt(names['median'])} ({_spread(names)}); their ingress program runs for every "
            "packet of every socket, which is what `-I ebpf:dns:off` saves on hosts that receive very many packets"
            if names
            else ""
        )
        + ". Per program, in the kernel: the section of bench/program_cost.py below.",
        f"- nflog and nfqueue: their rules match `--state NEW`, so the namespace tracks every connection; "
        f"each traced round starts from an empty table (a reset connection stays 10 s). At the end of a round "
        f"the table held up to {conntrack_peak:,} entries of {details.get('conntrack_max', 0):,}: a load like "
        "this one kept up longer fills it, and the kernel then drops new connections (`nf_conntrack: table full`).",
        f"- Flows: {flows['connects']:,} connects over {flows['expected']:,} flows with the auditor running "
        "(`-O iptables:verbose:1`); each flow's `N connection(s)` is compared with the load generator's own count: "
        f"{flows['lost']} missing, {flows['count_mismatches']} with a wrong count, {flows['client_failures']} failed "
        f"connects. The auditor's CPU from ready to the end of that load gives `userspace_cpu_s_per_million` "
        f"({flows['cpu_s']:.2f} s over {flows['load_seconds']:.1f} s of load).",
        "- Memory"
        + (
            f" (run alone, `bench/run.py --only memory`, {results['memory_started']})"
            if "memory_started" in results
            else ""
        )
        + f": VmRSS once running, then after {rss['flows_made']:,} new flows "
        f"(`-I ebpf:max_flows:{rss['max_flows']}`) were all announced: {rss['flows_seen']:,} seen, VmRSS "
        f"{_fmt(rss['rss_ready_mb'])} -> {_fmt(rss['rss_after_mb'])} MiB"
        + (
            f", RssAnon {_fmt(rss['anon_ready_mb'])} -> {_fmt(rss['anon_after_mb'])} MiB (the heap the BPF compile "
            "freed is returned at start, so the flows' memory is new memory, where it used to reuse that heap)"
            if "anon_ready_mb" in rss
            else ""
        )
        + f" ({rss['events_lost']:,} events lost in the burst, their flows recovered from the kernel's flow map).",
        f"- Noise: in {noisy} of {rounds} rounds another process (a test, another tracer) held BPF programs, "
        "or programs were attached at the cgroup root (untraced rounds), "
        "which may slow every connect: figures for the record come from a quiet machine. In a VM, how fast an "
        "idle vCPU wakes also moves loopback throughput (here a process that only wakes every millisecond "
        "raised it by 2.5%, a busy one at nice 19 cut it by 15%): read differences of a few per cent between "
        "runs as noise.",
    ]
    if PENDING:
        lines += ["", "Not measured yet:", ""]
    for key, why in PENDING.items():
        lines.append(f"- `{key}`: TODO: {why}.")
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def replace_section(path: Path, begin: str, end: str, section: str, first: bool = False) -> None:
    """Put `section` (from its `begin` marker to its `end` marker) in place of the old one in the
    file, keeping every other benchmark's section; a new one goes first (after the title) or last."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    elif first:
        head, _, body = text.partition("\n")
        text = head + "\n\n" + section + ("\n" + body.lstrip("\n") if body.strip() else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


SOAK_BEGIN = "<!-- soak:begin (bench/soak.py) -->"
SOAK_END = "<!-- soak:end -->"


def _cap(cap: int | str) -> str:
    return "262,144 (the default)" if cap == "default" else f"{cap:,}"


def soak_markdown(results: dict[str, Any]) -> str:
    """The soak's own section: its phases, memory and CPU over time."""
    soak = results["details"]["soak"]
    lines = [
        SOAK_BEGIN,
        "## Soak: a million distinct flows through the default flow map",
        "",
        f"`bench/soak.py` (also run by `sudo make bench`), {results.get('soak_started', results['started'])}: "
        f"{soak['flows']:,} distinct flows and {soak['connects']:,} connects in {soak['seconds']:.0f} s, "
        f"`max_flows` {soak['max_flows']}. Each burst: 200 addresses x 1,000 ports, one connect each, as fast "
        "as `bench/loadgen.c` goes beside the auditor on this machine's two cores; after each, the first 20 "
        f"addresses again, twice each, long after their generation was drained. The last burst forks a new "
        f"process per two connects ({soak['processes']:,} short-lived processes). `trace -i ebpf -o json "
        f"--no-live -o iptables`, `--flow-cap` {_cap(soak.get('flow_cap', 'default'))}; the "
        "capture's final totals against the "
        "load generator's own count per flow: a flow is held by its address, or past the cap by its /24 or "
        f"/16 network ({soak.get('held_exactly', 0):,} by address, {soak.get('held_in_networks', 0):,} in "
        f"{soak.get('network_flows', 0):,} network flows, each network's count the sum of its members'); "
        f"{soak['flows_lost']} flows missing, {soak['count_mismatches']} holders with a wrong count, "
        f"{soak['unexpected']} unexpected; {soak['events_lost']:,} events lost (their flows recovered from the "
        f"drained generations), {soak['map_full']} connects found the map full. The rules' header said: "
        + ("; ".join(f"`{n.lstrip('# ')}`" for n in soak.get("header_notes", [])) or "nothing")
        + ".",
        "",
        "| phase | flows so far | connects/s | events lost so far | VmRSS MiB | auditor CPU s "
        "| CPU s per 100k new flows |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in soak["phases"]:
        per = p.get("cpu_s_per_100k_flows")
        lines.append(
            f"| {p['phase']} | {p['flows_total']:,} | {p['rate']:,.0f} | {p['events_lost_total']:,} | "
            f"{p['rss_mb']:.1f} | {p['cpu_s']:.2f} | {'' if per is None else f'{per:.2f}'} |"
        )
    lines += [
        "",
        "VmRSS sampled over the run (s, MiB): " + ", ".join(f"{t:.0f}: {mb:.0f}" for t, mb in soak["rss_mb_samples"]),
        SOAK_END,
    ]
    return "\n".join(lines) + "\n"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """Replace this harness's sections of the file (or add them), keeping every other section."""
    replace_section(path, SECTION_BEGIN, SECTION_END, markdown(results), first=True)
    if "soak" in results.get("details", {}):
        replace_section(path, SOAK_BEGIN, SOAK_END, soak_markdown(results))
