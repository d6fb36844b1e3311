"""Real captures (three runs of the real tracer: TCP and UDP, IPv4 and IPv6, two
users, a secret on a command line, flows past --flow-cap 2) rendered by
`rules` in every output form and compared by `diff`: the text must stay the
same from one version of the code to the next, but for the version fields.
Regenerate on purpose only: EGRESS_AUDITOR_GOLDEN=write pytest -k capture_goldens."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "golden" / "captures"
ALL = ("--from", "web-1.jsonl", "--from", "web-2.jsonl", "--from", "web-3.jsonl")
CASES: dict[str, tuple[str, ...]] = {
    "rules_commands": ("rules", "--from", "web-1.jsonl"),
    "rules_commands_verbose2": ("rules", *ALL, "-O", "iptables:verbose:2"),
    "rules_restore_drop": ("rules", *ALL, "-O", "iptables:format:restore", "-O", "iptables:policy:drop"),
    "rules_commands_audit_user": ("rules", *ALL, "-O", "iptables:policy:audit", "-O", "iptables:scope:user"),
    "rules_commands_cgroup_aggregate": ("rules", *ALL, "-O", "iptables:scope:cgroup", "-O", "iptables:aggregate:24"),
    "rules_nft_drop_cgroup_v1": (
        "rules",
        *ALL,
        "-o",
        "nftables",
        "-O",
        "nftables:policy:drop",
        "-O",
        "nftables:scope:cgroup",
        "-O",
        "nftables:verbose:1",
    ),
    "rules_nft_verbose2": ("rules", *ALL, "-o", "nftables", "-O", "nftables:verbose:2"),
    "rules_nft_audit_aggregate": (
        "rules",
        *ALL,
        "-o",
        "nftables",
        "-O",
        "nftables:policy:audit",
        "-O",
        "nftables:aggregate:24",
    ),
    "rules_both_min_hosts": ("rules", *ALL, "--min-hosts", "2", "-o", "iptables", "-o", "nftables"),
    "rules_raw_cmdlines": ("rules", "--from", "web-2.jsonl", "--raw-cmdlines", "-O", "iptables:verbose:2"),
    "diff_1_2": ("diff", "web-1.jsonl", "web-2.jsonl"),
    "diff_2_3_json": ("diff", "web-2.jsonl", "web-3.jsonl", "--json"),
    "diff_3_1": ("diff", "web-3.jsonl", "web-1.jsonl"),
}
# Version fields: the tool's release and the capture schema's version.
VERSIONS = (
    (re.compile(r"egress-auditor \d+\.\d+\.\d+\S*"), "egress-auditor VERSION"),
    (re.compile(r'"version": ?\d+'), '"version": N'),
)


def run(args: tuple[str, ...], cwd: Path = HERE) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "egress_auditor", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    text = f"exit {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    for pattern, replacement in VERSIONS:
        text = pattern.sub(replacement, text)
    return text


@pytest.mark.parametrize("name", sorted(CASES))
def test_capture_renders_as_before(name: str) -> None:
    expected = HERE / "expected" / f"{name}.txt"
    text = run(CASES[name])
    if os.environ.get("EGRESS_AUDITOR_GOLDEN") == "write":
        expected.parent.mkdir(exist_ok=True)
        expected.write_text(text)
    assert text.startswith("exit 0\n"), text
    assert text == expected.read_text()


def test_version_1_captures_read_as_version_2(tmp_path: Path) -> None:
    """The same runs written as version 2 (what upgrade() makes of each line) render the same rules."""
    import jsonschema

    from egress_auditor.capture.records import VERSION, schema, upgrade

    validator = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())
    for name in ("web-1.jsonl", "web-2.jsonl", "web-3.jsonl"):
        lines = [json.loads(line) for line in (HERE / name).read_text().splitlines()]
        upgraded = [upgrade(record) for record in lines]
        for record in upgraded:
            validator.validate(record)
            assert record["version"] == VERSION
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in upgraded))
    args = ("rules", *ALL, "-o", "iptables", "-o", "nftables", "-O", "nftables:verbose:2")
    old, new = run(args), run(args, cwd=tmp_path)
    assert old.startswith("exit 0\n") and "allow_ipv4" in old
    assert new == old
