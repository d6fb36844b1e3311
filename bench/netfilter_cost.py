"""What a new connection costs under each input, against no auditing.

In a namespace of its own (so the nflog/nfqueue rules never touch the
machine's firewall), the load generator connects and closes one loopback
connection at a time. For each input, rounds alternate without and with the
auditor (ABBA); the cost per connection is 1/rate_with - 1/rate_without.
Every connect is new to netfilter (SO_LINGER 0: a fresh 5-tuple each time),
so the netfilter inputs get one message per connection; the eBPF input counts
repeats of a flow in the kernel.

    sudo .venv/bin/python -m bench.netfilter_cost [--seconds 3] [--rounds 2] [--inputs none,ebpf,nflog,nfqueue]

`measure(inputs, seconds, rounds, log)` returns the figures as a dict, for
bench/run.py to call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: bench/ is sys.path[0], the project is not (bench/checkout.py)
    import checkout  # noqa: F401

from bench.harness import (
    AUDITOR_RUNNING,
    Namespace,
    Tracer,
    auditor_command,
    build_loadgen,
    namespace,
    run_client,
    running,
    server,
)

ADDRS, PORTS = 4, 4  # 16 flows: few enough that every input sees each flow often
INPUT_ARGS = {
    "ebpf": ["-i", "ebpf"],
    "nflog": ["-i", "nflog", "-I", "nflog:setup:auto"],
    "nfqueue": ["-i", "nfqueue", "-I", "nfqueue:setup:auto"],
}


def _auditor(ns: Namespace, name: str, workdir: Path, index: int) -> Tracer:
    argv = ns.cmd([*auditor_command(), "trace", "--no-live", *INPUT_ARGS[name]])
    return Tracer(argv, AUDITOR_RUNNING, workdir, f"{name}-{index}")


def _rate(ns: Namespace, loadgen: Path, seconds: float) -> float:
    run_client(ns, loadgen, ADDRS, PORTS, count=ADDRS * PORTS)  # warm: every flow known, caches hot
    return run_client(ns, loadgen, ADDRS, PORTS, seconds=seconds).rate


def measure(
    inputs: Sequence[str] = ("ebpf", "nflog", "nfqueue"),
    seconds: float = 3.0,
    rounds: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Per input: median connects/s without and with it, and the cost per new connection in microseconds."""
    loadgen = build_loadgen()
    results: dict[str, Any] = {"round_seconds": seconds, "rounds": rounds, "flows": ADDRS * PORTS, "inputs": {}}
    with tempfile.TemporaryDirectory(prefix="ea-nfcost-") as tmp, namespace() as ns:
        workdir = Path(tmp)
        with server(ns, loadgen, PORTS, lifetime_s=int(len(inputs) * rounds * (seconds * 2 + 30)) + 60):
            for name in inputs:
                off: list[float] = []
                on: list[float] = []
                lost = 0
                for index in range(rounds):
                    for traced in (False, True) if index % 2 == 0 else (True, False):
                        if not traced:
                            off.append(_rate(ns, loadgen, seconds))
                            continue
                        tracer = _auditor(ns, name, workdir, index)
                        with running(tracer):
                            on.append(_rate(ns, loadgen, seconds))
                            stopped = tracer.stop()
                        lost += _lost(stopped.stderr)
                    log(f"  {name} round {index + 1}/{rounds}: {off[-1]:,.0f}/s without, {on[-1]:,.0f}/s with")
                rate_off, rate_on = statistics.median(off), statistics.median(on)
                results["inputs"][name] = {
                    "rate_off": round(rate_off, 1),
                    "rate_on": round(rate_on, 1),
                    "ratio": round(rate_on / rate_off, 3),
                    "cost_us_per_connection": round(1e6 / rate_on - 1e6 / rate_off, 2),
                    "events_lost": lost,
                }
    return results


def _lost(stderr: str) -> int:
    for line in stderr.splitlines():
        if "events lost" in line and "stopped" in line:
            return int(line.rsplit(",", 1)[1].split()[0])
    return 0


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| input | connects/s without | connects/s with | ratio | cost per new connection |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["inputs"].items():
        lines.append(
            f"| {name} | {r['rate_off']:,.0f} | {r['rate_on']:,.0f} | {r['ratio']:.2f} | "
            f"{r['cost_us_per_connection']:.1f} µs |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one timed round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per input (ABBA order)")
    parser.add_argument("--inputs", default="ebpf,nflog,nfqueue", help="comma-separated inputs to measure")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = measure([n for n in args.inputs.split(",") if n], args.seconds, args.rounds)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
