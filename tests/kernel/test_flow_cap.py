"""The flow cap with real connections: past --flow-cap, new destinations are
held as networks, past twice the cap only counted, and the rules' header says
so; the rules still load in iptables-restore and allow what was held, and the
capture gives back the same network rules."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from netns import Link, http_server

EGRESS_AUDITOR = Path(sys.executable).with_name("egress-auditor")
PORTS = (18590, 18591, 18592, 18593, 18594)


def test_past_the_cap_destinations_become_networks_then_counts(net: Link, tmp_path: Path) -> None:
    capture, rules_dir = tmp_path / "capture.jsonl", tmp_path / "rules"
    rules_dir.mkdir()
    # One connect a port, in order: 2 flows exact, the 3rd in a /24, the 4th in a /16, the 5th in none.
    script = " && ".join(f"curl -sS -o /dev/null --max-time 5 http://{net.b4}:{port}/" for port in PORTS)
    with contextlib.ExitStack() as servers:
        for port in PORTS:
            servers.enter_context(http_server(net.b, port))
        argv = ["nsenter", f"--net=/run/netns/{net.a.name}", str(EGRESS_AUDITOR), "trace", "--no-live",
                "--flow-cap", "2", "-o", "iptables", "-o", "json", "-O", f"json:file:{capture}",
                "-O", f"iptables:dir:{rules_dir}", "--", "sh", "-c", script]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    header = [line for line in done.stdout.splitlines() if line.startswith("#")]
    held = "past the flow cap (2), new destinations are held in 2 network flows (/24 or /16"
    assert any(held in line for line in header), header
    assert any("WARNING: 1 connections past twice the flow cap (4) are in no rule" in line for line in header), header
    statements = [line for line in done.stdout.splitlines() if line.startswith("iptables ")]
    prefix24 = ".".join(net.b4.split(".")[:3]) + ".0/24"
    prefix16 = ".".join(net.b4.split(".")[:2]) + ".0.0/16"
    wanted = {PORTS[0]: f"{net.b4}/32", PORTS[1]: f"{net.b4}/32", PORTS[2]: prefix24, PORTS[3]: prefix16}
    for port, dst in wanted.items():
        assert any(f"-d {dst} " in s and f"--dport {port} " in s for s in statements), (port, dst, statements)
    assert not any(f"--dport {PORTS[4]} " in s for s in statements), statements

    # The file rules load, and what they hold passes while the connect past twice the cap is dropped.
    v4 = rules_dir / "rules.v4"
    assert net.a.run(["iptables-restore", "--test", str(v4)], check=False).returncode == 0
    records = [json.loads(line) for line in capture.read_text().splitlines()]
    flows = [r for r in records if r["type"] == "flow"]
    assert sorted(r["dport"] for r in flows) == list(PORTS[:4]) and {r["dst"] for r in flows} == {net.b4}
    totals = {t["dport"]: t for t in records[-1]["totals"]}
    assert (totals[PORTS[2]].get("prefix"), totals[PORTS[3]].get("prefix")) == (24, 16), totals
    assert "prefix" not in totals[PORTS[0]] and all(t["connections"] == 1 for t in totals.values())

    again = subprocess.run([str(EGRESS_AUDITOR), "rules", "--from", str(capture)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert [s for s in again.stdout.splitlines() if s.startswith("iptables ")] == statements
