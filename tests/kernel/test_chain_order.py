"""The iptables commands output loaded for real in a network namespace: the
OUTPUT chain holds the rules in the order the file lists them, above the rules
that were there before."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flowdata import flows_of, sample_connections, summary
from netns import Namespace

from egress_auditor.plugins import select

NDP_NUMBERS = {"router-solicitation": "133", "neighbour-solicitation": "135", "neighbour-advertisement": "136"}


def rendered(*options: str) -> str:
    output = select("output", ["iptables"], list(options), default="iptables").create()[0]
    connections = sample_connections()
    return output.finish(flows_of(connections), summary(connections))


def key(rule: str) -> str:
    """What a rule allows, in a form both the file and `iptables -S` give the same way."""
    if found := re.search(r"-d (\S+) -p (\w+) -m \w+ --dport (\d+)", rule):
        return " ".join(found.groups())
    if "--ctstate" in rule:
        return "replies"
    if "-o lo " in rule:
        return "loopback"
    if found := re.search(r"--icmpv6-type (\S+)", rule):
        return "ndp " + NDP_NUMBERS.get(found.group(1), found.group(1))
    if "--comment mine" in rule:
        return "mine"
    raise AssertionError(f"unexpected rule: {rule}")


@pytest.mark.parametrize("policy", ["accept", "drop", "audit"])
def test_the_chain_holds_the_rules_in_the_files_order(client_ns: Namespace, tmp_path: Path, policy: str) -> None:
    text = rendered("iptables:verbose:1", f"iptables:policy:{policy}")
    script = tmp_path / "rules.sh"
    script.write_text(text)
    for binary in ("iptables", "ip6tables"):
        client_ns.run([binary, "-A", "OUTPUT", "-m", "comment", "--comment", "mine", "-j", "ACCEPT"])
    client_ns.run(["sh", "-e", str(script)])
    for binary in ("iptables", "ip6tables"):
        in_file = [key(line) for line in text.splitlines() if line.startswith(f"{binary} -I OUTPUT")]
        appended = ["audit"] if policy == "audit" else []  # after every rule, the user's too
        listed = client_ns.run([binary, "-S", "OUTPUT"]).stdout.splitlines()
        in_chain = [key(line) if "NFLOG" not in line else "audit" for line in listed if line.startswith("-A OUTPUT")]
        assert len(in_file) >= 2
        assert in_chain == [*in_file, "mine", *appended], text
        assert f"-P OUTPUT {'DROP' if policy == 'drop' else 'ACCEPT'}" in listed
