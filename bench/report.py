"""bench/results.json and the Markdown table of docs/benchmarks.md."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The figures of issue 7, in the order the table shows them.
KEYS = (
    "connect_ratio_ebpf",
    "connect_ratio_per_event_reference",
    "flows_expected",
    "flows_lost",
    "userspace_cpu_s_per_million",
    "startup_seconds",
    "rss_mb_ready",
    "rss_mb_100k_flows",
)


@dataclass(frozen=True)
class Goal:
    text: str  # as the issue states it
    at_least: float | None = None
    at_most: float | None = None

    def met(self, value: float) -> bool | None:
        if self.at_least is not None:
            return value >= self.at_least
        if self.at_most is not None:
            return value <= self.at_most
        return None  # reported only


GOALS = {
    "connect_ratio_ebpf": Goal("at least 0.97", at_least=0.97),
    "connect_ratio_per_event_reference": Goal("reported (what in-kernel counting buys)"),
    "flows_expected": Goal("reported"),
    "flows_lost": Goal("0, and every flow's count exact", at_most=0),
    "userspace_cpu_s_per_million": Goal("reported; grows with flows, not connections"),
    "startup_seconds": Goal("at most 1.5", at_most=1.5),
    "rss_mb_ready": Goal("reported"),
    "rss_mb_100k_flows": Goal("at most 64", at_most=64),
}

WHAT = {
    "connect_ratio_ebpf": "connects/s with `trace -i ebpf` running / without",
    "connect_ratio_per_event_reference": "the same for a tracer sending every connect to Python (bench/per_event.*)",
    "flows_expected": "distinct flows the load generator made",
    "flows_lost": "flows missing from the rules",
    "userspace_cpu_s_per_million": "CPU seconds (user+system) of the auditor per million connects",
    "startup_seconds": "from start to the running line",
    "rss_mb_ready": "resident memory (MiB) once running",
    "rss_mb_100k_flows": "growth of resident memory (MiB) from ready to holding 100,000 flows",
}

# Figures the issue asks for once their input exists; none is measured yet.
PENDING = {
    "connect_ratio_nflog": "the nflog input does not exist yet",
    "connect_ratio_nfqueue": "the nfqueue input does not exist yet",
    "udp": "the UDP input does not exist yet: the load generator needs a UDP mode (sendto over the same flows)",
}


def met(results: dict[str, Any], key: str) -> bool | None:
    """Whether a figure meets its goal; flows_lost also needs every count exact."""
    verdict = GOALS[key].met(results[key])
    if key == "flows_lost" and verdict is not None:
        verdict = verdict and results["details"]["flows"]["count_mismatches"] == 0
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


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    details = results["details"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `sudo make bench` (`bench/run.py`); the figures are in `bench/results.json`.",
        "Each ratio comes from one run that alternates rounds without and with the tracer.",
        "",
        f"Run: {results['started']} ({results['mode']} mode, {results['duration_s']:.0f} s).",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        f"| cores | {machine['cores']} ({machine['cpu']}) |",
        f"| memory | {machine['memory_gb']:.1f} GB |",
        f"| kernel | {machine['kernel']} |",
        f"| attach path | {machine['attach']} |",
        f"| Python, BCC | {machine['python']}, {machine['bcc']} |",
        "",
        "## Figures",
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
    flows = details["flows"]
    ratio = details["connect_ratio_ebpf"]
    reference = details["connect_ratio_per_event_reference"]
    rss = details["rss_mb_100k_flows"]
    lines += [
        "",
        "## How each figure is made",
        "",
        f"- Load: `bench/loadgen.c` (built with the machine's gcc into `bench/build/`), in a network namespace "
        f"made for the run: a client connecting and closing (SO_LINGER 0) one connection at a time, round-robin "
        f"over {ratio['flows']:,} flows ({ratio['addresses']} loopback addresses 127.100.x.y x {ratio['ports']} "
        f"ports), and an epoll server accepting and closing.",
        f"- Ratios: {ratio['n']} rounds with and {ratio['n']} without, alternating (ABBA), "
        f"{ratio['round_seconds']:g} s each after an untimed pass over every flow; the figure is the median of the "
        f"per-pair ratios. Rates (connects/s, median): untraced {ratio['rate_off_median']:,.0f}, "
        f"auditor {ratio['rate_on_median']:,.0f}; per-event reference: untraced "
        f"{reference['rate_off_median']:,.0f}, traced {reference['rate_on_median']:,.0f} "
        f"(events lost by the reference: {reference['events_lost']:,}).",
        f"- Noise: in {ratio['rounds_with_other_bpf_users'] + reference['rounds_with_other_bpf_users']} of "
        f"{4 * ratio['n']} rounds another process (a test, another tracer) held BPF programs, which may slow "
        "every connect; figures for the record come from a quiet machine.",
        f"- Flows: {flows['connects']:,} connects over {flows['expected']:,} flows with the auditor running "
        f"(`-O iptables:verbose:1`); every flow's `N connection(s)` is compared with the load generator's own "
        f"count: {flows['lost']} missing, {flows['count_mismatches']} with a wrong count, "
        f"{flows['client_failures']} failed connects. Its CPU from ready to the load's end gives "
        f"`userspace_cpu_s_per_million` ({flows['cpu_s']:.2f} s over {flows['load_seconds']:.1f} s of load).",
        f"- Memory: VmRSS once running, then after {rss['flows_made']:,} new flows "
        f"(`-I ebpf:max_flows:{rss['max_flows']}`) were all announced: {rss['flows_seen']:,} seen, "
        f"VmRSS {_fmt(rss['rss_ready_mb'])} → {_fmt(rss['rss_after_mb'])} MiB, "
        f"{rss['events_lost']:,} events lost (recovered from the flow map).",
        "- Start-up: every start of the auditor in the run (the median is the figure).",
        "",
        "## Not measured yet",
        "",
    ]
    for key, why in PENDING.items():
        lines.append(f"- `{key}`: {why}. TODO when it lands: add it to `bench/run.py` like `connect_ratio_ebpf`.")
    return "\n".join(lines) + "\n"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(results))
