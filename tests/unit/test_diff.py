"""`egress-auditor diff`: destinations added and gone between captures, as text and JSON."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

from flowdata import START, conn, proc, summary

from egress_auditor.capture.baseline import diff
from egress_auditor.capture.reader import read_captures
from egress_auditor.model import Connection, Transport
from unit.test_capture import capture

EGRESS_AUDITOR = Path(sys.executable).with_name("egress-auditor")
CURL = proc(4242, "curl", 1000, "alice", ["curl"])
HOSTILE = proc(4243, "evil\x1b[2J\nname", 1000, "alice", ["evil"])


def named(c: Connection, name: str) -> Connection:
    return dataclasses.replace(c, hostname=name)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EGRESS_AUDITOR), "diff", *args], capture_output=True, text=True, timeout=60)


def write(tmp_path: Path) -> tuple[Path, Path]:
    old = [
        conn(CURL, "192.0.2.10", 443, START),
        named(conn(CURL, "198.51.100.6", 443, START + 1), "cdn.example.com"),
        conn(CURL, "192.0.2.53", 53, START + 2, protocol=Transport.UDP),
    ]
    new = [
        conn(CURL, "192.0.2.10", 443, START + 100, connections=4),
        named(conn(CURL, "198.51.100.7", 443, START + 101), "CDN.example.com"),  # rotated address
        conn(HOSTILE, "203.0.113.9", 8443, START + 102),
    ]
    capture(tmp_path / "old.jsonl", old, summary(old), host="web-1")
    capture(tmp_path / "new.jsonl", new, summary(new), host="web-1")
    return tmp_path / "old.jsonl", tmp_path / "new.jsonl"


def test_added_gone_and_rotated_addresses(tmp_path: Path) -> None:
    old, new = write(tmp_path)
    changes = diff(read_captures([str(old)]).flows, read_captures([str(new)]).flows)
    assert [(str(r.dst), r.dport) for r in changes.added] == [("203.0.113.9", 8443)]
    assert [(str(r.dst), r.dport, r.protocol) for r in changes.gone] == [("192.0.2.53", 53, Transport.UDP)]
    old_address = ipaddress.ip_address("198.51.100.6")
    assert [(str(r.dst), names) for r, names in changes.readdressed] == [
        ("198.51.100.7", [("CDN.example.com", [old_address])])
    ]


def test_text_escapes_and_exit_code(tmp_path: Path) -> None:
    old, new = write(tmp_path)
    done = run(str(old), str(new))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("1 added, 1 gone, 1 known name(s) at a new address; old: 1 run(s) on web-1")
    added = next(line for line in lines if line.startswith("+ "))
    assert "TCP 203.0.113.9 port 8443: 1 connection(s)" in added and "seen on web-1 in 1 run(s)" in added
    assert "evil\\x1b[2J\\x0aname" in added and "\x1b" not in done.stdout
    assert any(line.startswith("- UDP 192.0.2.53 port 53") for line in lines)
    assert any(line.startswith("~ TCP 198.51.100.7 port 443 (CDN.example.com)") and "was 198.51.100.6" in line
               for line in lines)  # fmt: skip
    assert run("--exit-code", str(old), str(new)).returncode == 3
    assert run("--exit-code", str(old), str(old)).returncode == 0
    same = run(str(old), str(old))
    assert same.stdout.startswith("0 added, 0 gone, 0 known name(s)")


def test_json_and_repeatable_sides(tmp_path: Path) -> None:
    old, new = write(tmp_path)
    done = run("--old", str(old), "--old", str(old), "--new", str(new), "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert [a["dst"] for a in record["added"]] == ["203.0.113.9"]
    assert record["added"][0]["processes"] == ["evil\x1b[2J\nname"]  # JSON keeps the text, escaped by json
    assert "\x1b" not in done.stdout
    assert record["gone"][0]["protocol"] == "udp" and record["gone"][0]["hosts"] == ["web-1"]
    assert record["readdressed"][0]["known_as"] == [{"name": "CDN.example.com", "old": ["198.51.100.6"]}]


def test_bad_input_gets_one_line_and_status_2(tmp_path: Path) -> None:
    old, _ = write(tmp_path)
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n")
    for args, wanted in (
        ([str(old)], "diff takes OLD.jsonl NEW.jsonl"),
        (["--old", str(old)], "diff takes OLD.jsonl NEW.jsonl"),
        (["--new", str(old), str(old), str(old)], "not both"),
        ([str(old), str(old), str(old)], "diff takes OLD.jsonl NEW.jsonl"),
        ([str(old), str(junk)], f"{junk}:1: not JSON"),
        ([str(old), str(tmp_path / "missing.jsonl")], "cannot read capture"),
    ):
        done = run(*args)
        assert done.returncode == 2, (args, done)
        assert done.stderr.count("\n") == 1 and wanted in done.stderr, done.stderr
