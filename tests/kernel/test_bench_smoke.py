"""The benchmark harness runs end to end in its quick mode (tiny numbers, a few
seconds per tracer) and writes every figure. Speeds are not judged here: the
full `sudo make bench` on a quiet machine is the judge."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def bench_module(name: str) -> ModuleType:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # bench/ lives beside the package, not inside it
    return importlib.import_module(name)


def test_quick_run_writes_every_key_with_a_sane_value(tmp_path: Path) -> None:
    run = bench_module("bench.run")
    report = bench_module("bench.report")
    json_path, md_path = tmp_path / "results.json", tmp_path / "benchmarks.md"
    md_path.write_text("# Benchmarks\n\n<!-- other:begin -->\nkept as it was\n<!-- other:end -->\n")
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()

    run.main(["--quick", "--json", str(json_path), "--markdown", str(md_path)])

    results = json.loads(json_path.read_text())
    assert results["mode"] == "quick"
    for key in report.KEYS:
        assert isinstance(results[key], int | float) and math.isfinite(results[key]), key
    for key in (k for k in report.KEYS if k.startswith("connect_ratio_")):
        assert 0 < results[key] < 10, key
    cfg = run.QUICK
    assert results["flows_expected"] == cfg.addrs * cfg.ports
    assert results["flows_lost"] == 0
    assert results["details"]["flows"]["count_mismatches"] == 0
    # The soak: its flows pass through a small map's generations, each present with its exact count.
    assert results["soak_flows"] == cfg.soak.bursts * cfg.soak.addrs * cfg.soak.ports
    assert results["soak_flows_lost"] == 0
    assert results["details"]["soak"]["count_mismatches"] == 0 and results["details"]["soak"]["unexpected"] == 0
    assert results["soak_rss_mb"] > 1
    assert results["userspace_cpu_s_per_million"] >= 0
    assert 0 < results["startup_seconds"] < 60
    assert results["rss_mb_ready"] > 1
    assert abs(results["rss_mb_100k_flows"]) < 1024
    assert results["details"]["rss_mb_100k_flows"]["flows_seen"] == cfg.rss_addrs * cfg.ports
    assert results["machine"]["cores"] >= 1 and results["machine"]["kernel"]
    # The kernel timed our programs and the empty one on the same connects: ours do more than nothing.
    cost = results["details"]["connect_prog_ns"]
    assert 0 < results["connect_prog_floor_ns"] < results["connect_prog_ns"], cost
    assert any(name.startswith("connect4") for name in cost["programs"]), cost["programs"]
    cpu = results["details"]["client_cpu_overhead_ci_high"]
    assert cpu["ci95_low"] <= cpu["median"] <= cpu["ci95_high"] == results["client_cpu_overhead_ci_high"]
    assert cpu["client_cpu_ns_off_median"] > 0 and cpu["client_cpu_ns_on_median"] > 0
    assert 0 < results["startup_bcc_floor_seconds"] < 60
    assert results["details"]["startup_seconds"]["n"] == results["details"]["startup_bcc_floor_seconds"]["n"]
    # The floor returns its freed heap; whatever the auditor holds, both are read from /proc.
    floor = results["details"]["rss_anon_mb_bcc_floor"]
    assert 1 < results["rss_anon_mb_bcc_floor"] <= floor["untrimmed"]["median"]
    assert 1 < results["rss_anon_mb_ready"] < results["rss_mb_ready"]
    latency = results["details"]["connect_ratio_nfqueue"]["connect_latency_us"]
    for state in ("traced", "untraced"):
        assert 0 < latency[state]["p50_median"] <= latency[state]["p99_median"], latency
    assert results["nfqueue_connect_p99_ms"] == round(latency["traced"]["p99_median"] / 1000, 3)
    assert results["nfqueue_connect_p99_ms_untraced"] > 0
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == stats_before, "the counters left as found"
    # Every traced round of each eBPF load saw every flow before its timed part, UDP ones included.
    for key in ("connect_ratio_ebpf", "connect_ratio_ebpf_udp", "connect_ratio_ebpf_udp_connect"):
        assert results["details"][key]["flows_announced_min"] == cfg.addrs * cfg.ports, key

    text = md_path.read_text()
    assert "kept as it was" in text, "another benchmark's section was lost"
    assert text.count(report.SECTION_BEGIN) == 1 and text.count(report.SECTION_END) == 1
    for key in report.KEYS:
        assert f"`{key}`" in text


def test_program_cost_names_each_program_and_writes_its_section(tmp_path: Path) -> None:
    cost = bench_module("bench.program_cost")
    md_path = tmp_path / "benchmarks.md"
    md_path.write_text("# Benchmarks\n\n<!-- other:begin -->\nkept as it was\n<!-- other:end -->\n")

    data = cost.main(["--rounds", "1", "--markdown", str(md_path)])

    names = {row["name"] for row in data["programs"]}
    # Every connect runs the connect hook once; every packet delivered runs the ingress program (DNS).
    assert {"connect4", "ingress"} <= names, names
    hook = next(row for row in data["programs"] if row["name"] == "connect4")
    # Once per connect of the load; other processes' connects on the host (tests beside it) run it too.
    assert 1 <= hook["runs"] / data["connects"] < 1.5
    assert all(ns > 0 for ns in data["connect_hook_ns"].values())
    assert set(data["empty_hooks"]) == {"cgroup_skb ingress", "cgroup_skb egress", "connect4"}
    text = md_path.read_text()
    assert "kept as it was" in text and text.count(cost.SECTION_BEGIN) == 1 and "| connect4 |" in text


def test_connect_variants_measures_each_build_against_no_program() -> None:
    variants = bench_module("bench.connect_variants")
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    argv = ["same=-DEA_UNUSED_FLAG", "--flows", "100", "--rounds", "2", "--seconds", "0.3", "--runtime"]
    summary = variants.main(argv)

    assert list(summary) == ["off", "empty", "ours", "same"]
    assert summary["off"]["ratio"]["median"] == 1.0 and "run_ns_per_connect" not in summary["off"]
    for state in ("empty", "ours", "same"):
        ratio = summary[state]["ratio"]
        assert ratio["n"] == 2 and 0 < ratio["median"] < 10, state
        assert summary[state]["run_ns_per_connect"]["n"] == 2, state
    # The kernel timed every build; ours does more than an empty program.
    run = {state: summary[state]["run_ns_per_connect"]["median"] for state in ("empty", "ours")}
    assert 0 < run["empty"] < run["ours"], run
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == stats_before, "the counters left as found"


def test_connect_variants_refuses_a_variant_named_like_a_fixed_state() -> None:
    variants = bench_module("bench.connect_variants")
    for text in ("off=-DX", "empty", "=-DX"):
        try:
            variants.parse_variant(text)
        except SystemExit as exc:
            assert text.partition("=")[0] in str(exc) or "bad variant" in str(exc)
        else:
            raise AssertionError(f"{text!r} was accepted")
    assert variants.parse_variant("lines=-DA,-DB=2") == ("lines", ["-DA", "-DB=2"])
