"""Review across hosts with real captures: three test hosts (each a network
namespace with a UTS namespace and host name of its own) run real traces of
real curls to a real server, and `rules --from` over their captures gives
each rule the hosts that saw it, flags weak evidence, and with --min-hosts
keeps only what enough hosts saw, listing the rest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from netns import Link, Namespace, http_server, link, namespace

EGRESS_AUDITOR = Path(sys.executable).with_name("egress-auditor")
COMMON, RARE, ONCE = 18290, 18291, 18292


def capture_on(host: str, client: Namespace, server: str, ports: list[int], path: Path) -> None:
    """`trace -- sh -c 'curl ...'` on a test host named `host`; nsenter keeps cgroup v2 visible."""
    script = " && ".join(f"curl -sS -o /dev/null --max-time 5 http://{server}:{p}/" for p in ports)
    argv = [
        "nsenter", f"--net=/run/netns/{client.name}", "unshare", "--uts", "sh", "-c",
        'hostname "$1" && shift && exec "$@"', "sh", host,
        str(EGRESS_AUDITOR), "trace", "--no-live", "-o", "json", "-O", f"json:file:{path}", "--", "sh", "-c", script,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def rules_from(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EGRESS_AUDITOR), "rules", *args], capture_output=True, text=True, timeout=60)


def block(text: str, port: int) -> str:
    """The `#` lines above the rule for `port`, and the rule."""
    match = re.search(rf"((?:^#.*\n)*)^iptables .*--dport {port} .*$", text, re.M)
    assert match, text
    return match.group(0)


def test_review_of_three_hosts(net: Link, tmp_path: Path) -> None:
    plan = {"web-1": [COMMON, RARE, RARE, ONCE], "web-2": [COMMON, RARE], "web-3": [COMMON]}
    captures = []
    with namespace("h2") as second, namespace("h3") as third, http_server(net.b, COMMON), \
            http_server(net.b, RARE), http_server(net.b, ONCE):  # fmt: skip
        # Each host reaches the same server address over a veth of its own.
        for ns in (second, third):
            ns.run(["ip", "route", "add", f"{net.b4}/32", "via", link(ns, net.b).b4])
        for name, ns in {"web-1": net.a, "web-2": second, "web-3": third}.items():
            path = tmp_path / f"{name}.jsonl"
            capture_on(name, ns, net.b4, plan[name], path)
            captures += ["--from", str(path)]
    reviewed = rules_from(*captures, "-O", "iptables:verbose:1")
    assert reviewed.returncode == 0, reviewed.stderr
    common = block(reviewed.stdout, COMMON)
    assert "seen on 3 of 3 host(s): web-1, web-2, web-3; in 3 run(s)" in common
    rare = block(reviewed.stdout, RARE)
    assert "seen on 2 of 3 host(s): web-1, web-2; in 2 run(s)" in rare
    assert "seen once" not in rare
    once = block(reviewed.stdout, ONCE)
    assert "seen on 1 of 3 host(s): web-1; in 1 run(s)" in once
    # Each run lasted seconds: all of it is start-up traffic, and one destination had one connection.
    assert re.search(r"weak evidence: seen once; seen only in the first 60s of a run", once), once
    assert "weak evidence: seen only in the first 60s" in common

    kept = rules_from(*captures, "--min-hosts", "2")
    assert kept.returncode == 0, kept.stderr
    statements = [line for line in kept.stdout.splitlines() if not line.startswith("#")]
    assert any(f"--dport {COMMON} " in s for s in statements) and any(f"--dport {RARE} " in s for s in statements)
    assert not any(f"--dport {ONCE} " in s for s in statements), statements
    header = kept.stdout[: kept.stdout.index("\niptables")]
    assert "# left out: 1 rule(s) seen on fewer than 2 host(s) (--min-hosts 2):" in header
    assert re.search(rf"^#   TCP to {re.escape(net.b4)} port {ONCE}: 1 connection", header, re.M), header
    assert [line for line in kept.stderr.splitlines() if "left out" in line] == [
        "egress-auditor: left out: 1 rule(s) seen on fewer than 2 host(s) (--min-hosts 2), listed in the header"
    ]
