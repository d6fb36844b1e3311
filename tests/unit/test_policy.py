"""Policy options of the firewall outputs: what each writes, and bad values refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from flowdata import flows_of, sample_connections, summary

from egress_auditor.plugins import select

EGRESS_AUDITOR = Path(sys.executable).with_name("egress-auditor")


def render(output: str, *options: str) -> str:
    connections = sample_connections()
    chosen = select("output", [output], list(options), default=output).create()[0]
    return chosen.finish(flows_of(connections), summary(connections))


def test_audit_restore_logs_last_and_drops_nothing() -> None:
    lines = render("iptables", "iptables:format:restore", "iptables:policy:audit").splitlines()
    assert ":OUTPUT ACCEPT [0:0]" in lines
    assert lines[lines.index(":OUTPUT ACCEPT [0:0]") + 1] == "-A OUTPUT -o lo -j ACCEPT"
    rules = [line for line in lines if line.startswith("-A OUTPUT")]
    assert rules[-1] == '-A OUTPUT -j NFLOG --nflog-group 100 --nflog-prefix "egress-auditor audit: "'
    assert not any("DROP" in line for line in lines if not line.startswith("#"))


def test_audit_nft_logs_and_counts_last_under_accept() -> None:
    text = render("nftables", "nftables:policy:audit", "nftables:log_group:7", "nftables:log_prefix:would drop ")
    chain = text[text.index("chain output") :].splitlines()
    assert "policy accept;" in chain[1]
    assert chain[2].strip().startswith('oif "lo" accept')
    assert chain[-3].strip().startswith('counter log prefix "would drop " group 7 ')


def test_accept_policy_adds_no_loopback_rule() -> None:
    for output in ("iptables", "nftables"):
        text = render(output)
        assert "-o lo" not in text and 'oif "lo"' not in text


@pytest.mark.parametrize(
    ("option", "wanted"),
    [
        ("iptables:policy:deny", "valid: accept, drop, audit"),
        ("nftables:loopback:off", "valid: accept, rules"),
        ("iptables:log_group:70000", "a group number from 0 to 65535"),
        ('nftables:log_prefix:a"b', "without quotes"),
        ("nftables:log_prefix:" + "x" * 64, "1 to 63 bytes"),
    ],
)
def test_bad_policy_options_get_one_line_and_status_2(option: str, wanted: str) -> None:
    output = option.split(":", 1)[0]
    done = subprocess.run(
        [str(EGRESS_AUDITOR), "rules", "--from", "/dev/null", "-o", output, "-O", option],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and wanted in done.stderr, done.stderr
    assert done.stdout == ""
