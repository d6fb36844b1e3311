"""-O iptables:scope:none|user|cgroup: one rule per destination and uid or
cgroup, with the owner or cgroup match; a cgroup that cannot be used falls
back to the uid and says why; the nftables output groups the same way."""

from __future__ import annotations

import dataclasses
import re

import pytest
from flowdata import START, conn, flows_of, proc, summary

from egress_auditor.escape import iptables_cgroup_path
from egress_auditor.model import Attribution, Connection, Process
from egress_auditor.outputs import nftables
from egress_auditor.plugins import select
from egress_auditor.rules.scope import scoped_rules

NGINX = "/system.slice/nginx.service"
HOSTILE = '/user.slice/a"b; touch x.scope'


def kernel(process: Process, cgroup: str | None) -> Process:
    return dataclasses.replace(process, cgroup=cgroup, attribution=Attribution.KERNEL)


def connections() -> list[Connection]:
    curl = proc(4242, "curl", 1000, "alice", ["curl", "https://example.org/"])
    nginx = proc(700, "nginx", 33, "www-data", ["nginx: worker process"])
    apt = proc(5000, "http", 42, "_apt", ["/usr/lib/apt/methods/http"])
    odd = proc(6000, "odd", 1001, "bob", ["odd"])
    audited = proc(6100, "pip", 1000, "alice", ["pip", "install", "x"])
    return [
        conn(kernel(curl, "/user.slice/user-1000.slice/session-3.scope"), "192.0.2.10", 443, START + 1),
        conn(kernel(nginx, NGINX), "192.0.2.10", 443, START + 2),
        conn(kernel(apt, None), "192.0.2.20", 80, START + 3),
        conn(kernel(odd, HOSTILE), "192.0.2.30", 443, START + 4),
        conn(kernel(audited, "/egress-auditor-77-abcdef"), "192.0.2.40", 443, START + 5),
        conn(kernel(nginx, NGINX), "2001:db8::10", 5432, START + 6),
    ]


def render(*options: str) -> str:
    output = select("output", ["iptables"], list(options), default="iptables").create()[0]
    cs = connections()
    return output.finish(flows_of(cs), summary(cs))


def rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("iptables ", "ip6tables ", "-A OUTPUT -d"))]


def test_scope_none_is_one_rule_per_destination_without_owner_or_cgroup() -> None:
    lines = rules(render("iptables:scope:none"))
    assert len(lines) == 5
    assert not any("-m owner" in line or "-m cgroup" in line for line in lines)
    assert "# scope" not in render("iptables:scope:none")


def test_scope_user_splits_a_destination_by_uid() -> None:
    lines = rules(render("iptables:scope:user"))
    shared = [line for line in lines if "-d 192.0.2.10/32" in line]
    assert sorted(re.search(r"--uid-owner (\d+) ", line)[1] for line in shared) == ["1000", "33"]
    assert all("-m owner --uid-owner " in line for line in lines)
    assert len(lines) == 6


def test_scope_cgroup_uses_the_path_and_falls_back_to_the_uid() -> None:
    text = render("iptables:scope:cgroup", "iptables:verbose:1")
    lines = rules(text)
    assert "-d 192.0.2.10/32 -p tcp -m tcp --dport 443 -m cgroup --path /system.slice/nginx.service " in "\n".join(
        lines
    )
    assert any("--path /user.slice/user-1000.slice/session-3.scope " in line for line in lines)
    assert any("-d 2001:db8::10/128" in line and "--path /system.slice/nginx.service" in line for line in lines)
    # Unknown, unwritable and the audited command's own cgroup: the uid instead, and why.
    for dst, uid in (("192.0.2.20", 42), ("192.0.2.30", 1001), ("192.0.2.40", 1000)):
        (line,) = [line for line in lines if f"-d {dst}/32" in line]
        assert f"-m owner --uid-owner {uid} " in line and "-m cgroup" not in line
    assert "#   cgroup unknown: scoped by uid" in text
    assert "cannot be written for iptables: scoped by uid" in text
    assert "removed when it ends: scoped by uid" in text
    # The hostile path only ever appears in # lines, never in a command.
    assert all(line.startswith("#") for line in text.splitlines() if "touch" in line)
    assert "# -m cgroup --path is looked up when a rule is loaded" in text


def test_restore_format_carries_the_same_matches() -> None:
    text = render("iptables:scope:cgroup", "iptables:format:restore")
    assert "-A OUTPUT -d 192.0.2.10/32 -p tcp -m tcp --dport 443 -m cgroup --path /system.slice/nginx.service" in text
    assert "2001:db8" not in text.replace("# ", "\n").split("*filter")[1]  # IPv4 file only


def test_nftables_and_iptables_group_alike() -> None:
    flows = flows_of(connections())
    mine = scoped_rules(flows, "cgroup", iptables_cgroup_path, "iptables")
    theirs = nftables.scoped_rules(flows, "cgroup")
    assert [(s.rule, s.uid, bool(s.cgroup)) for s in mine] == [(s.rule, s.uid, bool(s.cgroup)) for s in theirs]


@pytest.mark.parametrize(
    ("path", "written"),
    [
        (NGINX, NGINX),
        ("system.slice/nginx.service", NGINX),
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice",
            "/user.slice/user-1000.slice/user@1000.service/app.slice",
        ),
        ("/", None),
        ("/a/../b", None),
        ("/system.slice/dev-disk-by\\x2duuid.swap", None),  # sh and iptables-restore both eat the backslash
        ('/a"b', None),
        ("/a b", None),
        ("/caf\u00e9.service", None),
        ("/a$(touch x)", None),
        ("/a\nb", None),
    ],
)
def test_iptables_cgroup_path_is_a_bare_word_or_refused(path: str, written: str | None) -> None:
    assert iptables_cgroup_path(path) == written
