"""The nftables output: golden files, one table of its own, sets, scope and
provenance. Loading into a real kernel is in tests/kernel/test_nftables_netns.py."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import stat
from pathlib import Path

import pytest
from flowdata import CURL, NTP, START, WGET, conn, flows_of, proc, sample_connections, summary

from egress_auditor.escape import NFT_COMMENT_MAX
from egress_auditor.model import Attribution, Connection, Flow, Process, Summary
from egress_auditor.outputs.nftables import TABLE, scoped_rules
from egress_auditor.plugins import select
from egress_auditor.rules.rule import rules_from_flows

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("EA_UPDATE_GOLDEN") == "1"


def render(flows: list[Flow], run: Summary, *options: str) -> str:
    """Through the real option parsing and plugin factory, as `trace -o nftables -O ...` does."""
    output = select("output", ["nftables"], list(options), default="nftables").create()[0]
    return output.finish(flows, run)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with EA_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from the golden file (EA_UPDATE_GOLDEN=1 regenerates it)"


def in_cgroup(process: Process, path: str | None) -> Process:
    service = path.rsplit("/", 1)[-1] if path else None
    return dataclasses.replace(process, cgroup=path, service=service, attribution=Attribution.KERNEL)


NGINX = in_cgroup(proc(800, "nginx", 33, "www-data", ["nginx: worker process"]), "/system.slice/nginx.service")
CRON = in_cgroup(proc(810, "curl", 33, "www-data", ["curl", "-s", "http://x/"]), "/system.slice/cron.service")
ODD_CGROUP = in_cgroup(proc(820, "job", 1000, "alice"), '/user.slice/a"b; touch x.scope')
NO_CGROUP = proc(830, "wget", 1000, "alice")


def scoped_connections() -> list[Connection]:
    """One destination used by two services and two users; a cgroup nft cannot name; an unknown one."""
    return [
        conn(NGINX, "192.0.2.10", 443, START + 1, connections=2),
        conn(CRON, "192.0.2.10", 443, START + 2),
        conn(ODD_CGROUP, "192.0.2.10", 443, START + 3),
        conn(NO_CGROUP, "192.0.2.10", 443, START + 4),
        conn(NGINX, "2001:db8::1", 8080, START + 5),
        conn(NTP, "203.0.113.5", 123, START + 6),
    ]


CASES = {
    "nft_accept_v0.nft": (sample_connections, ()),
    "nft_drop_v2.nft": (sample_connections, ("nftables:policy:drop", "nftables:verbose:2")),
    "nft_user_v1.nft": (sample_connections, ("nftables:scope:user", "nftables:verbose:1")),
    "nft_cgroup_v1.nft": (scoped_connections, ("nftables:scope:cgroup", "nftables:verbose:1")),
    "nft_cgroup_drop_v0.nft": (scoped_connections, ("nftables:scope:cgroup", "nftables:policy:drop")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    make, options = CASES[name]
    connections = make()
    check_golden(name, render(flows_of(connections), summary(connections), *options))


def test_golden_empty_and_single() -> None:
    check_golden("nft_empty_drop.nft", render([], summary([]), "nftables:policy:drop"))
    # One destination per family: plain rules, no sets.
    single = [conn(CURL, "192.0.2.10", 443, START), conn(CURL, "2001:db8::1", 443, START + 1)]
    check_golden("nft_single.nft", render(flows_of(single), summary(single, lost=3)))


def test_replaces_only_its_own_table_in_one_file() -> None:
    connections = sample_connections()
    lines = render(flows_of(connections), summary(connections), "nftables:policy:drop").splitlines()
    statements = [line for line in lines if line and not line.lstrip().startswith("#")]
    # Create if missing, delete, define: loading twice gives the same ruleset, nothing else is flushed.
    assert statements[:3] == [f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    assert not any(re.match(r"\s*(flush|delete)\b", line) for line in statements[2:])
    assert sum(1 for line in statements if line.startswith("table ")) == 2
    assert [line for line in statements if "policy" in line] == [
        "\t\ttype filter hook output priority filter; policy drop;"
    ]
    chain = statements[statements.index("\tchain output {") :]
    assert chain[2].startswith('\t\toif "lo" accept')  # loopback first: local services survive a drop policy
    assert chain[3] == "\t\tct state established,related accept"
    assert "nd-neighbor-solicit" in chain[4] and "nd-neighbor-advert" in chain[4]


def test_sets_shorten_the_ruleset() -> None:
    connections = sample_connections()
    text = render(flows_of(connections), summary(connections))
    rules = rules_from_flows(flows_of(connections))
    elements = re.findall(r"^\t\t\t(\S+) \. (tcp|udp) \. (\d+) comment \"([^\"]*)\",$", text, re.M)
    assert sorted((d, p, int(port)) for d, p, port, _ in elements) == sorted(
        (str(r.dst), r.protocol.name.lower(), r.dport) for r in rules
    )
    lookups = [line for line in text.splitlines() if "@allow_" in line]
    assert len(lookups) == 2  # one rule per family however many destinations
    assert "ip daddr . meta l4proto . th dport @allow_ipv4 accept" in lookups[0]
    assert "ip6 daddr . meta l4proto . th dport @allow_ipv6 accept" in lookups[1]


def test_every_rule_and_element_carries_provenance() -> None:
    connections = sample_connections()
    for options in ((), ("nftables:scope:user",)):
        lines = render(flows_of(connections), summary(connections), *options).splitlines()
        allows = [i for i, line in enumerate(lines) if re.search(r'(accept|,) ?comment "|comment "[^"]*",$', line)]
        allows = [i for i in allows if "destinations seen" not in lines[i]]
        assert len(allows) == len(scoped_rules(flows_of(connections), options[0][-4:] if options else "none"))
        for i in allows:
            above = lines[i - 2 : i]
            assert re.search(r"# (TCP|UDP) to \S+ port \d+: \d+ connection\(s\), first \S+Z, last \S+Z$", above[0])
            assert re.search(r"#   by .*\((\w|-)+, (proc|kernel|name-only)\)", above[1]), above[1]


def test_user_scope_splits_by_uid() -> None:
    connections = sample_connections()
    text = render(flows_of(connections), summary(connections), "nftables:scope:user")
    assert "type ipv4_addr . inet_proto . inet_service . uid" in text
    assert "ip daddr . meta l4proto . th dport . meta skuid @allow_ipv4 accept" in text
    # curl (uid 1000) and wget (uid 0) share 192.0.2.10:443: one element each.
    assert '192.0.2.10 . tcp . 443 . 0 comment "wget",' in text
    assert '192.0.2.10 . tcp . 443 . 1000 comment "curl",' in text


def test_cgroup_scope() -> None:
    connections = scoped_connections()
    text = render(flows_of(connections), summary(connections), "nftables:scope:cgroup")
    statements = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    rules = [line for line in statements if "socket cgroupv2" in line]
    assert rules == [
        'socket cgroupv2 level 2 "system.slice/cron.service" ip daddr 192.0.2.10 tcp dport 443 accept comment "curl"',
        'socket cgroupv2 level 2 "system.slice/nginx.service" ip daddr 192.0.2.10 tcp dport 443 accept comment "nginx"',
        'socket cgroupv2 level 2 "system.slice/nginx.service" ip6 daddr 2001:db8::1 tcp dport 8080 accept '
        'comment "nginx"',
    ]
    # A cgroup nft cannot name, and an unknown one, fall back to the uid, and say so.
    assert "cgroup unknown: scoped by uid" in text
    assert "cannot be written for nft: scoped by uid" in text
    assert '192.0.2.10 . tcp . 443 . 1000 comment "job, wget",' in text
    assert not any("touch" in line for line in statements)  # the odd path is only named in # lines
    assert "each cgroup must exist" in text


def test_cgroup_scope_keeps_counts_per_service() -> None:
    scoped = scoped_rules(flows_of(scoped_connections()), "cgroup")
    nginx = [s for s in scoped if s.cgroup == "system.slice/nginx.service" and s.rule.dport == 443]
    assert len(nginx) == 1 and nginx[0].rule.connections == 2 and nginx[0].cgroup_level == 2
    assert [p.name for p in nginx[0].rule.processes] == ["nginx"]


def test_long_comment_is_within_nft_limit() -> None:
    many = [conn(proc(7000 + i, f"worker-\u00e9{i:03d}", 0, "root"), "192.0.2.99", 443, START + i) for i in range(40)]
    text = render(flows_of(many), summary(many))
    comments = re.findall(r'accept comment "([^"]*)"$', text, re.M)
    assert len(comments) == 1
    assert NFT_COMMENT_MAX - 6 < len(comments[0].encode()) <= NFT_COMMENT_MAX
    assert comments[0].startswith("worker-%C3%A9000, ")


@pytest.mark.parametrize("seed", range(3))
def test_insertion_order_does_not_matter(seed: int) -> None:
    connections = sample_connections() + scoped_connections()
    shuffled = list(connections)
    random.Random(seed).shuffle(shuffled)
    for options in (("nftables:verbose:2",), ("nftables:scope:user",), ("nftables:scope:cgroup",)):
        assert render(flows_of(shuffled), summary(connections), *options) == render(
            flows_of(connections), summary(connections), *options
        )


def test_file_option_writes_the_same_text(tmp_path: Path) -> None:
    connections = [conn(WGET, "192.0.2.10", 443, START)]
    target = tmp_path / "nftables.d" / "egress.nft"
    stdout = render(flows_of(connections), summary(connections), f"nftables:file:{target}")
    assert target.read_text() == stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["egress.nft"]


@pytest.mark.parametrize(
    ("option", "valid"),
    [
        ("nftables:policy:reject", "accept, drop"),
        ("nftables:scope:pid", "none, user, cgroup"),
        ("nftables:verbose:3", "0, 1, 2"),
    ],
)
def test_bad_option_values_name_valid_ones(option: str, valid: str) -> None:
    from egress_auditor.errors import UsageError

    with pytest.raises(UsageError, match=f"valid: {valid}"):
        select("output", ["nftables"], [option], default="nftables")
