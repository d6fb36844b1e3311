"""Soak: a million distinct flows and more through the auditor at its default max_flows, in bursts
at full speed, and every flow and every connect checked in its JSON capture. Also part of
`sudo make bench`; alone: `sudo .venv/bin/python bench/soak.py [--quick]` (or `bench/run.py --only soak`).

Each burst makes addrs x ports new flows, one connect each, as fast as the load generator goes; a
repeat pass then connects again to part of them, long after their generation was drained. The last
burst forks a short-lived process per few connects. After each phase the auditor's own summary line
must show every flow and connect; its RSS and CPU are sampled then. At the end the capture's totals
are compared with the load generator's own counts per flow."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: bench/ is sys.path[0], the project is not (bench/checkout.py)
    import checkout  # noqa: F401

from bench.harness import (
    AUDITOR_RUNNING,
    BUILD_DIR,
    PORT_BASE,
    Namespace,
    Tracer,
    auditor_command,
    build_loadgen,
    cpu_seconds,
    namespace,
    running,
    server,
    status_mb,
)

SUMMARY = re.compile(r"summary: (\d+) flows, (\d+) connections, (\d+) events lost")
SAMPLE_S = 1.0  # RSS and CPU sampled this often while the soak runs
SUMMARY_EVERY = "1s"


@dataclass(frozen=True)
class SoakConfig:
    bursts: int  # bursts of new flows, each over addrs x ports, on addresses no earlier burst used
    addrs: int
    ports: int
    repeat_addrs: int  # after each burst, these first addresses of it again ...
    repeats: int  # ... this many times each
    fork_every: int  # the last burst: a new process per this many connects (0: none)
    max_flows: int | None  # None: the auditor's default
    flow_cap: int | None  # None: the auditor's default --flow-cap
    catch_up_s: float
    # Far from the addresses the other stages use (bench_addr from 0): the auditor traces every
    # namespace, so another benchmark's load to the same flows would be counted in them.
    first_addr: int = 20_000


FULL = SoakConfig(bursts=6, addrs=200, ports=1000, repeat_addrs=20, repeats=2, fork_every=2, max_flows=None,
                  flow_cap=None, catch_up_s=300.0)  # fmt: skip
QUICK = SoakConfig(bursts=3, addrs=5, ports=1000, repeat_addrs=1, repeats=2, fork_every=2, max_flows=1024,
                   flow_cap=4096, catch_up_s=60.0)  # fmt: skip


def run_load(ns: Namespace, loadgen: Path, first_addr: int, addrs: int, ports: int, count: int, out: Path,
             fork_every: int = 0) -> dict[str, Any]:  # fmt: skip
    """One load generator run over addresses first_addr.. ; its JSON, and its per-flow counts in `out`."""
    env = dict(os.environ, LOADGEN_ADDR_BASE=str(first_addr))
    if fork_every:
        env["LOADGEN_FORK_EVERY"] = str(fork_every)
    argv = [str(loadgen), "client", str(addrs), str(PORT_BASE), str(ports), "0", str(count), "0", str(out)]
    done = subprocess.run(ns.cmd(argv), capture_output=True, text=True, check=True, timeout=3600, env=env)
    return json.loads(done.stdout)


def add_counts(made: dict[tuple[str, int], int], out: Path) -> None:
    for line in out.read_text().splitlines():
        address, port, attempts, _failures = line.split()
        made[(address, int(port))] = made.get((address, int(port)), 0) + int(attempts)


def last_summary(tracer: Tracer) -> tuple[int, int, int] | None:
    found = None
    for line in tracer.read_lines():
        match = SUMMARY.search(line)
        if match:
            found = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    return found


def soak(cfg: SoakConfig, loadgen: Path, workdir: Path, auditor: list[str], log: Any = print) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    capture = workdir / "soak.jsonl"
    capture.unlink(missing_ok=True)
    argv = [*auditor, "trace", "-i", "ebpf", "--no-live", "--summary-every", SUMMARY_EVERY, "-o", "json"]
    argv += ["-O", f"json:file:{capture}", "-o", "iptables", "-O", f"iptables:dir:{workdir}"]
    if cfg.max_flows:
        argv += ["-I", f"ebpf:max_flows:{cfg.max_flows}"]
    if cfg.flow_cap:
        argv += ["--flow-cap", str(cfg.flow_cap)]
    made: dict[tuple[str, int], int] = {}
    phases: list[dict[str, Any]] = []
    samples: list[tuple[float, float, float]] = []  # (seconds, VmRSS MiB, CPU s)
    per_burst = cfg.addrs * cfg.ports
    with namespace() as ns, server(ns, loadgen, cfg.ports, lifetime_s=7200):
        tracer = Tracer(argv, AUDITOR_RUNNING, workdir, "soak")
        with running(tracer):
            began = time.monotonic()
            seen = (0, 0, 0)
            connects = 0
            for burst in range(cfg.bursts):
                first = cfg.first_addr + burst * cfg.addrs
                forks = cfg.fork_every if burst == cfg.bursts - 1 else 0
                loads = [("burst", first, cfg.addrs, per_burst, forks)]
                if cfg.repeat_addrs and cfg.repeats:
                    n = cfg.repeat_addrs * cfg.ports
                    loads.append(("repeat", first, cfg.repeat_addrs, n * cfg.repeats, 0))
                for kind, first_addr, addrs, count, fork_every in loads:
                    cpu_before, t0 = cpu_seconds(tracer.pid), time.monotonic()
                    out = workdir / f"soak-{burst}-{kind}.txt"
                    result = run_load(ns, loadgen, first_addr, addrs, cfg.ports, count, out, fork_every)
                    load_s = time.monotonic() - t0
                    add_counts(made, out)
                    connects += result["connects"]
                    deadline = time.monotonic() + cfg.catch_up_s
                    while time.monotonic() < deadline:
                        seen = last_summary(tracer) or seen
                        samples.append((time.monotonic() - began, status_mb(tracer.pid), cpu_seconds(tracer.pid)))
                        # Past the flow cap flows are held as networks: every connect counted is the test.
                        if seen[1] >= connects:
                            break
                        time.sleep(SAMPLE_S)
                    cpu = cpu_seconds(tracer.pid) - cpu_before
                    new_flows = per_burst if kind == "burst" else 0
                    phase = {
                        "phase": f"{kind} {burst + 1}",
                        "flows_total": len(made),
                        "connects": result["connects"],
                        "rate": result["rate"],
                        "processes": result.get("processes", 0),
                        "load_s": round(load_s, 2),
                        "caught_up_s": round(time.monotonic() - t0, 2),
                        "auditor_flows": seen[0],
                        "auditor_connects": seen[1],
                        "events_lost_total": seen[2],
                        "rss_mb": round(status_mb(tracer.pid), 1),
                        "cpu_s": round(cpu, 2),
                        **({"cpu_s_per_100k_flows": round(cpu / (new_flows / 1e5), 2)} if new_flows else {}),
                    }
                    phases.append(phase)
                    log(f"  {phase}")
            stopped = tracer.stop(timeout_s=900)
    totals, summary = read_capture(capture)
    held = holders(made, totals)
    lost = [f for f in made if f not in held]
    # Every holder's count is the sum of its members' connects: exact for an address, a network's in all.
    expected: dict[tuple[str, int, int], int] = {}
    for flow, holder in held.items():
        expected[holder] = expected.get(holder, 0) + made[flow]
    wrong = [h for h, n in expected.items() if totals[h] != n]
    if wrong:
        log(f"  wrong counts, e.g. {wrong[:3]}: " + ", ".join(f"{totals[h]} != {expected[h]}" for h in wrong[:3]))
    ours = {h for h in totals if h[0].startswith("127.100.")}
    notes = [line for line in (workdir / "rules.v4").read_text().splitlines() if "flow cap" in line]
    bursts = [p for p in phases if "cpu_s_per_100k_flows" in p]
    return {
        "flows": len(made),
        "flows_lost": len(lost),
        "count_mismatches": len(wrong),
        "unexpected": len(ours - set(expected)),
        "held_exactly": sum(1 for h in held.values() if h[1] == 0),
        "held_in_networks": sum(1 for h in held.values() if h[1] != 0),
        "network_flows": len({h for h in held.values() if h[1] != 0}),
        "header_notes": notes,
        "connects": sum(made.values()),
        "processes": sum(p["processes"] for p in phases),
        "events_lost": summary.get("events_lost", -1),
        "map_full": summary.get("map_full", -1),
        "rss_mb": phases[-1]["rss_mb"] if phases else 0.0,
        "cpu_s_per_100k_flows": [p["cpu_s_per_100k_flows"] for p in bursts],
        "max_flows": cfg.max_flows or "default",
        "flow_cap": cfg.flow_cap or "default",
        "phases": phases,
        "rss_mb_samples": [[round(t, 1), round(rss, 1)] for t, rss, _cpu in samples[:: max(1, len(samples) // 60)]],
        "exit_status": stopped.returncode,
        "seconds": round(time.monotonic() - began, 1),
    }


def read_capture(path: Path) -> tuple[dict[tuple[str, int, int], int], dict[str, Any]]:
    """(destination, prefix (0: the address alone), port) -> count of every TCP flow in the capture's
    summary, and the summary."""
    summary: dict[str, Any] = {}
    with path.open() as f:
        for line in f:
            if '"type":"summary"' in line[:80]:
                summary = json.loads(line)
    totals: dict[tuple[str, int, int], int] = {}
    for t in summary.get("totals", []):
        if t["protocol"] == "tcp":
            key = (t["dst"], t.get("prefix", 0), t["dport"])
            totals[key] = totals.get(key, 0) + t["connections"]
    return totals, summary


def holders(
    made: dict[tuple[str, int], int], totals: dict[tuple[str, int, int], int]
) -> dict[tuple[str, int], tuple[str, int, int]]:
    """Each flow made -> the capture's flow that holds it: its address, else its /24 or /16 network."""
    found = {}
    for address, port in made:
        octets = address.split(".")
        for key in (
            (address, 0, port),
            (".".join(octets[:3]) + ".0", 24, port),
            (".".join(octets[:2]) + ".0.0", 16, port),
        ):
            if key in totals:
                found[(address, port)] = key
                break
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run: a small map, few flows")
    parser.add_argument("--bursts", type=int, help="bursts of new flows (default: the mode's)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/soak.py needs root (BPF programs, network namespaces)")
    cfg = QUICK if args.quick else FULL
    if args.bursts:
        cfg = dataclasses.replace(cfg, bursts=args.bursts)
    result = soak(cfg, build_loadgen(), BUILD_DIR / f"soak-{'quick' if args.quick else 'full'}", auditor_command(),
                  log=lambda text: print(text, file=sys.stderr, flush=True))  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k not in ("phases", "rss_mb_samples")}, indent=1))
    return result


if __name__ == "__main__":
    main()
