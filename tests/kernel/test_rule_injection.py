"""Hostile process names and command lines inject nothing: the rules are run by
real sh and loaded by real iptables / iptables-restore inside a fresh network
namespace, and each flow gives exactly one ACCEPT rule with its escaped comment."""

from __future__ import annotations

import ipaddress
import shlex
from collections import Counter
from pathlib import Path

import pytest
from flowdata import START, conn, flows_of, proc, summary
from netns import Namespace

from egress_auditor.escape import COMMENT_MAX, rule_comment
from egress_auditor.model import Connection, Family, Flow
from egress_auditor.plugins import select
from egress_auditor.rules.rule import Rule, rules_from_flows

RuleKey = tuple[str, str, str, str]  # destination/prefix, protocol, port, comment
MARKERS = "PQRSTUVWXYZ"
# The part of a verbose-2 line that comes before a command line (see outputs/firewall.rule_comments).
CMDLINE_PREFIX = "#     command line: "
RESTORE_CHUNK = 10239  # iptables-restore reads a line in fgets(10240) pieces


def hostile_connections(markers: Path) -> list[Connection]:
    """Flows whose names, command lines and parents each try to run `touch MARKER` or add a rule."""
    m = {letter: shlex.quote(str(markers / letter)) for letter in MARKERS}
    grand = proc(10, f"\r\ntouch {m['V']}\r\n", 0, "root", ["init", f"\n\ntouch {m['V']}"])
    parent = proc(
        20,
        f"'; touch {m['T']}; '",
        0,
        "root",
        ["sh", "-c", f'"$(touch {m["U"]})"', "\x1b]0;owned\x07", "\x1b[2J", "\\"],
        parent=grand,
    )
    aligned = "A" * (RESTORE_CHUNK - len(CMDLINE_PREFIX)) + "-A OUTPUT -d 192.0.2.251/32 -j ACCEPT"
    processes = [
        proc(101, f'";touch {m["P"]}', 1000, "alice", [f'";touch {m["P"]}', "x"], parent=parent),
        proc(102, "curl", 1000, "alice", ["curl", f"\ntouch {m['Q']}", "\n-A OUTPUT -j ACCEPT"], parent=parent),
        proc(103, f"$(touch {m['R']})", 1001, f"$(touch {m['R']})", [f"$(touch {m['R']})"], parent=parent),
        proc(104, f"`touch {m['S']}`", 0, "root", [f"`touch {m['S']}`", "'", '"', "\\\\"], parent=parent),
        proc(105, "esc\x1b[2J\x1b]0;owned\x07\u202e\x00", 0, "root", ["\x00\x7f\x9b", "\u2066x\u2069"]),
        proc(106, "restore", 0, "root", ["x\nCOMMIT\n*filter\n-A OUTPUT -d 192.0.2.250/32 -j ACCEPT\nCOMMIT"]),
        proc(107, "longline", 0, "root", [aligned], parent=parent),
        # Escapes to well over 255 bytes: the comment must be cut, and still load.
        proc(108, "\u00e9" * 100 + f'";touch {m["W"]}', 0, "root", [f"$(touch {m['W']})"]),
        proc(109, "%%%%" * 30 + f"`touch {m['X']}`", 0, "root", ["\\$(touch " + m["X"] + ")"]),
    ]
    connections = []
    for i, process in enumerate(processes):
        connections.append(conn(process, f"192.0.2.{10 + i}", 443 + i, START + i))
        connections.append(conn(process, f"2001:db8::{10 + i:x}", 443 + i, START + i))
    # One destination shared by every hostile process: one rule whose comment names them all.
    connections.extend(conn(p, "198.51.100.1", 8443, START + 50) for p in processes)
    connections.extend(conn(p, "2001:db8:1::1", 8443, START + 50) for p in processes)
    return connections


def render(flows: list[Flow], connections: list[Connection], *options: str) -> str:
    output = select("output", ["iptables"], list(options), default="iptables").create()[0]
    return output.finish(flows, summary(connections))


def expected_keys(rules: list[Rule], family: Family) -> Counter[RuleKey]:
    prefix = 32 if family is Family.IPV4 else 128
    return Counter(
        (f"{r.dst}/{prefix}", r.protocol.name.lower(), str(r.dport), rule_comment(", ".join(r.names)))
        for r in rules
        if r.family is family
    )


def loaded_rules(ns: Namespace, family: Family) -> tuple[list[str], Counter[RuleKey]]:
    """The OUTPUT chain as iptables -S shows it: the other lines, and each -d rule as a key."""
    binary = "iptables" if family is Family.IPV4 else "ip6tables"
    lines = ns.run([binary, "-S", "OUTPUT"]).stdout.splitlines()
    keyed: Counter[RuleKey] = Counter()
    others = []
    for line in lines:
        words = shlex.split(line)
        if "-d" not in words:
            others.append(line)
            continue
        assert words[-2:] == ["-j", "ACCEPT"], line
        dst = after(words, "-d")
        ipaddress.ip_network(dst)  # a real address, not something an injection made up
        keyed[(dst, after(words, "-p"), after(words, "--dport"), after(words, "--comment"))] += 1
    return others, keyed


def after(words: list[str], flag: str) -> str:
    # A rule an injection added may lack a match: it then shows up as a key no flow expects.
    return words[words.index(flag) + 1] if flag in words else f"<no {flag}>"


def assert_no_markers(markers: Path) -> None:
    assert sorted(p.name for p in markers.iterdir()) == [], "a hostile name ran a command"


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    path = tmp_path / "markers"
    path.mkdir()
    return path


@pytest.fixture
def hostile(markers: Path) -> tuple[list[Connection], list[Flow], list[Rule]]:
    connections = hostile_connections(markers)
    flows = flows_of(connections)
    return connections, flows, rules_from_flows(flows)


def test_hostile_flows_are_what_the_test_needs(hostile: tuple[list[Connection], list[Flow], list[Rule]]) -> None:
    # Guard the test data: long comments, both families, a long # line, a shared rule.
    _, _, rules = hostile
    comments = [rule_comment(", ".join(r.names), limit=10**9) for r in rules]
    assert max(len(c) for c in comments) > COMMENT_MAX
    assert {r.family for r in rules} == {Family.IPV4, Family.IPV6}
    assert max(len(r.processes) for r in rules) == 9


def test_commands_run_by_sh_inject_nothing(
    client_ns: Namespace, tmp_path: Path, markers: Path, hostile: tuple[list[Connection], list[Flow], list[Rule]]
) -> None:
    connections, flows, rules = hostile
    script = tmp_path / "rules.sh"
    script.write_text(render(flows, connections, "iptables:verbose:2", "iptables:policy:drop"))
    assert max(map(len, script.read_text().splitlines())) < RESTORE_CHUNK  # the long line was cut

    result = client_ns.run(["sh", str(script)], check=False, cwd=markers)
    assert_no_markers(markers)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    for family in (Family.IPV4, Family.IPV6):
        others, keyed = loaded_rules(client_ns, family)
        assert keyed == expected_keys(rules, family)
        assert all(count == 1 for count in keyed.values())
        assert others[0] == "-P OUTPUT DROP"
        assert "-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" in others
        assert "-A OUTPUT -o lo -j ACCEPT" in others
        assert len(others) == (3 if family is Family.IPV4 else 6)  # policy, loopback, replies (and 3 NDP types)


@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6])
def test_restore_files_inject_nothing(
    client_ns: Namespace,
    tmp_path: Path,
    markers: Path,
    hostile: tuple[list[Connection], list[Flow], list[Rule]],
    family: Family,
) -> None:
    connections, flows, rules = hostile
    target = tmp_path / "persist"
    stdout = render(
        flows,
        connections,
        "iptables:format:restore",
        "iptables:verbose:2",
        "iptables:policy:drop",
        f"iptables:dir:{target}",
    )
    path = target / ("rules.v4" if family is Family.IPV4 else "rules.v6")
    if family is Family.IPV4:
        assert stdout == path.read_text()
    binary = "iptables-restore" if family is Family.IPV4 else "ip6tables-restore"

    tested = client_ns.run([binary, "--test", str(path)], check=False, cwd=markers)
    assert tested.returncode == 0, tested.stderr
    _, keyed = loaded_rules(client_ns, family)
    assert not keyed  # --test loads nothing

    loaded = client_ns.run([binary, str(path)], check=False, cwd=markers)
    assert loaded.returncode == 0, loaded.stderr
    assert_no_markers(markers)
    others, keyed = loaded_rules(client_ns, family)
    assert keyed == expected_keys(rules, family)
    assert all(count == 1 for count in keyed.values())
    assert others[0] == "-P OUTPUT DROP" and others[1] == "-A OUTPUT -o lo -j ACCEPT"
    assert len(others) == (3 if family is Family.IPV4 else 6)


def test_long_comment_loads(client_ns: Namespace, tmp_path: Path) -> None:
    # 300 characters that each escape to 6 bytes: far past xt_comment's 255 before it is cut.
    name = "\u00e9" * 300
    connections = [
        conn(proc(1, name, 0, "root"), "192.0.2.7", 443, START),
        conn(proc(2, name, 0, "root"), "2001:db8::7", 443, START),
    ]
    flows = flows_of(connections)
    comment = rule_comment(name)
    assert len(rule_comment(name, limit=10**9)) > COMMENT_MAX >= len(comment.encode()) > COMMENT_MAX - 6

    script = tmp_path / "rules.sh"
    script.write_text(render(flows, connections))
    result = client_ns.run(["sh", str(script)], check=False)
    assert result.returncode == 0, result.stderr
    for family, dst in ((Family.IPV4, "192.0.2.7/32"), (Family.IPV6, "2001:db8::7/128")):
        _, keyed = loaded_rules(client_ns, family)
        assert keyed == Counter({(dst, "tcp", "443", comment): 1})

    restore = tmp_path / "rules.v4"
    restore.write_text(render(flows, connections, "iptables:format:restore"))
    loaded = client_ns.run(["iptables-restore", str(restore)], check=False)
    assert loaded.returncode == 0, loaded.stderr
    _, keyed = loaded_rules(client_ns, Family.IPV4)
    assert keyed == Counter({("192.0.2.7/32", "tcp", "443", comment): 1})
