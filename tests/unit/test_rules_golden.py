"""The iptables output, byte for byte, against golden files in tests/unit/golden.

EA_UPDATE_GOLDEN=1 rewrites the golden files from the current output; review
the diff before committing it.
"""

from __future__ import annotations

import os
import random
import re
import stat
from pathlib import Path

import pytest
from flowdata import KERNEL_ROOT, KERNEL_WWW, START, conn, flows_of, sample_connections, summary

from egress_auditor.escape import COMMENT_MAX, rule_comment
from egress_auditor.model import Flow, Process, Summary
from egress_auditor.plugins import select
from egress_auditor.rules.rule import rules_from_flows

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("EA_UPDATE_GOLDEN") == "1"


def render(flows: list[Flow], run: Summary, *options: str) -> str:
    """Through the real option parsing and plugin factory, as `trace -O ...` does."""
    output = select("output", ["iptables"], list(options), default="iptables").create()[0]
    return output.finish(flows, run)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with EA_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from the golden file (EA_UPDATE_GOLDEN=1 regenerates it)"


CASES = {
    "commands_v0.txt": ("iptables:verbose:0",),
    "commands_v1.txt": ("iptables:verbose:1",),
    "commands_v2.txt": ("iptables:verbose:2",),
    "commands_v2_drop.txt": ("iptables:verbose:2", "iptables:policy:drop"),
    "restore_v4_accept.txt": ("iptables:format:restore", "iptables:verbose:1"),
    "restore_v4_drop.txt": ("iptables:format:restore", "iptables:policy:drop", "iptables:verbose:2"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    connections = sample_connections()
    check_golden(name, render(flows_of(connections), summary(connections), *CASES[name]))


@pytest.mark.parametrize("policy", ["accept", "drop"])
@pytest.mark.parametrize("verbose", ["0", "2"])
def test_golden_dir_writes_v4_and_v6(tmp_path: Path, policy: str, verbose: str) -> None:
    # The restore files for both families, and the normal stdout alongside them.
    connections = sample_connections()
    target = tmp_path / "etc" / "iptables"
    stdout = render(
        flows_of(connections),
        summary(connections),
        f"iptables:dir:{target}",
        f"iptables:policy:{policy}",
        f"iptables:verbose:{verbose}",
    )
    assert sorted(p.name for p in target.iterdir()) == ["rules.v4", "rules.v6"]  # no temporary files left
    v4, v6 = (target / "rules.v4").read_text(), (target / "rules.v6").read_text()
    check_golden(f"dir_{policy}_v{verbose}_rules.v4.txt", v4)
    check_golden(f"dir_{policy}_v{verbose}_rules.v6.txt", v6)
    assert stdout == render(
        flows_of(connections), summary(connections), f"iptables:policy:{policy}", f"iptables:verbose:{verbose}"
    )
    for name in ("rules.v4", "rules.v6"):
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o640


def test_dir_restore_stdout_is_the_v4_file(tmp_path: Path) -> None:
    connections = sample_connections()
    stdout = render(flows_of(connections), summary(connections), "iptables:format:restore", f"iptables:dir:{tmp_path}")
    assert stdout == (tmp_path / "rules.v4").read_text()


def test_golden_empty_and_lossy_run() -> None:
    check_golden("commands_empty.txt", render([], summary([]), "iptables:verbose:2", "iptables:policy:drop"))
    connections = sample_connections()[:2]
    lossy = summary(connections, lost=7, map_full=3)
    check_golden("restore_v4_lossy.txt", render(flows_of(connections), lossy, "iptables:format:restore"))


# ---------------------------------------------------------------- properties of the rules

RULE_LINE = re.compile(
    r"^(ip6?tables) -I OUTPUT \d+ -d (\S+)/(\d+) -p (\w+) -m \w+ --dport (\d+) "
    r'-m comment --comment "([^"]*)" -j ACCEPT$'
)


def rule_lines(text: str) -> list[re.Match[str]]:
    return [m for line in text.splitlines() if (m := RULE_LINE.match(line))]


def test_one_rule_per_destination_naming_every_process() -> None:
    connections = sample_connections()
    text = render(flows_of(connections), summary(connections), "iptables:verbose:1")
    matches = rule_lines(text)
    keys = [(m[4], m[2], m[5]) for m in matches]
    assert len(keys) == len(set(keys))
    expected = {(c.protocol.name.lower(), str(c.dst), str(c.dport)) for c in connections}
    assert set(keys) == expected
    shared = [m for m in matches if (m[2], m[5]) == ("192.0.2.10", "443")]
    assert len(shared) == 1
    assert shared[0][6] == "curl, wget"  # two uids, two programs, one rule
    tied = [m for m in matches if (m[2], m[5]) == ("192.0.2.20", "8080")]
    assert tied[0][6] == rule_comment("kworker/u8:2")  # the same name twice is named once
    # Every process of a shared rule gets its own # line with pid and user.
    assert "#   curl (pid 4242) running as alice" in text
    assert "#   wget (pid 4300) running as root" in text
    assert "running as www-data" in text
    assert "exited before it could be inspected" in text


def test_rule_counts_and_times_are_merged() -> None:
    connections = sample_connections()
    rules = rules_from_flows(flows_of(connections))
    shared = next(r for r in rules if str(r.dst) == "192.0.2.10" and r.dport == 443)
    assert shared.connections == 4  # 3 repeats from curl and one wget
    assert (shared.first_seen, shared.last_seen) == (START + 1, START + 5)
    assert {p.pid for p in shared.processes} == {4242, 4300}


@pytest.mark.parametrize("seed", range(5))
def test_insertion_order_does_not_matter(seed: int) -> None:
    connections = sample_connections()
    shuffled = list(connections)
    random.Random(seed).shuffle(shuffled)
    flows = flows_of(shuffled)
    random.Random(seed + 100).shuffle(flows)
    for options in CASES.values():
        assert render(flows, summary(connections), *options) == render(
            flows_of(connections), summary(connections), *options
        )


def test_tied_processes_have_a_fixed_order() -> None:
    # Same name and pid, two users: the order must come from the data, not from set iteration.
    a = flows_of([conn(KERNEL_ROOT, "192.0.2.20", 8080, START), conn(KERNEL_WWW, "192.0.2.20", 8080, START)])
    b = flows_of([conn(KERNEL_WWW, "192.0.2.20", 8080, START), conn(KERNEL_ROOT, "192.0.2.20", 8080, START)])
    assert rules_from_flows(a)[0].processes == rules_from_flows(b)[0].processes
    assert rules_from_flows(list(reversed(a)))[0].processes == rules_from_flows(a)[0].processes


def test_ipv6_rules_use_ip6tables_and_128() -> None:
    connections = sample_connections()
    text = render(flows_of(connections), summary(connections), "iptables:verbose:2", "iptables:policy:drop")
    matches = rule_lines(text)
    assert {m[1] for m in matches} == {"iptables", "ip6tables"}
    for m in matches:
        v6 = ":" in m[2]
        assert m[1] == ("ip6tables" if v6 else "iptables")
        assert m[3] == ("128" if v6 else "32")
    assert "ip6tables -P OUTPUT DROP" in text.splitlines()
    assert "iptables -P OUTPUT DROP" in text.splitlines()


def test_restore_files_hold_one_family_each(tmp_path: Path) -> None:
    connections = sample_connections()
    render(flows_of(connections), summary(connections), f"iptables:dir:{tmp_path}")
    v4, v6 = (tmp_path / "rules.v4").read_text(), (tmp_path / "rules.v6").read_text()
    v4_rules = [line for line in v4.splitlines() if "--comment" in line]
    v6_rules = [line for line in v6.splitlines() if "--comment" in line]
    assert v4_rules and all("/32 " in line and "/128" not in line for line in v4_rules)
    assert v6_rules and all("/128 " in line and "/32 " not in line for line in v6_rules)
    assert "icmpv6-type" in v6 and "icmpv6-type" not in v4
    assert v4.splitlines()[-1] == v6.splitlines()[-1] == "COMMIT"


def test_long_names_keep_the_comment_within_255() -> None:
    many = [
        conn(
            Process(pid=7000 + i, name=f"worker-\u00e9{i:03d}", uid=0, user="root"),
            "192.0.2.99",
            443,
            START + i,
        )
        for i in range(60)
    ]
    matches = rule_lines(render(flows_of(many), summary(many)))
    assert len(matches) == 1
    assert len(matches[0][6]) == COMMENT_MAX
    assert matches[0][6].startswith("worker-%C3%A9000, worker-%C3%A9001")
    assert re.search("%(?![0-9A-F]{2})", matches[0][6]) is None  # never cut inside an escape
