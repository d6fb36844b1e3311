"""The json output: one record per new flow as it is seen, a summary at the
end, every line valid against the shipped JSON Schema, hostile text kept on
one line of ASCII, and the file reopened on request (SIGHUP)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from flowdata import START, conn, proc, sample_connections, summary
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_auditor.capture.flows import FlowTable
from egress_auditor.capture.records import VERSION, schema
from egress_auditor.errors import UsageError
from egress_auditor.model import Attribution, Connection, Family, Transport
from egress_auditor.outputs.json_lines import JsonLinesOutput
from egress_auditor.plugins import select

VALIDATOR = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())
CONSOLE = Path(sys.executable).with_name("egress-auditor")


def make(*options: str, stdout: io.StringIO | None = None) -> JsonLinesOutput:
    chosen = select("output", ["json"], list(options), default="json").chosen["json"]
    return JsonLinesOutput(chosen, stdout=stdout)


def feed(output: JsonLinesOutput, connections: list[Connection]) -> FlowTable:
    table = FlowTable()
    for c in connections:
        flow, is_new = table.add(c)
        output.connection(c, flow, is_new)
    return table


def records(text: str) -> list[dict]:
    lines = text.splitlines()
    assert all(line.isascii() for line in lines)
    parsed = [json.loads(line) for line in lines]
    for record in parsed:
        VALIDATOR.validate(record)
    return parsed


def test_schema_is_shipped_in_the_package_and_is_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
    assert schema()["$id"].endswith(f":{VERSION}")
    assert Path(__file__).resolve().parents[2].joinpath("egress_auditor", "capture", "schema", "flow-v1.json").is_file()


def test_schema_names_every_attribution_and_protocol() -> None:
    # The schema is written by hand: it must not drift from the model.
    defs = schema()["$defs"]
    assert defs["process"]["properties"]["attribution"]["enum"] == [a.value for a in Attribution]
    assert defs["protocol"]["enum"] == [p.name.lower() for p in Transport]
    assert defs["family"]["enum"] == [f.label.lower() for f in Family]


def test_one_record_per_new_flow_then_a_summary() -> None:
    stdout = io.StringIO()
    output = make(stdout=stdout)
    connections = sample_connections()
    # Every event reaches the output; repeats of a flow write nothing more.
    table = feed(output, connections + connections)
    flows = list(table)
    streamed = records(stdout.getvalue())
    assert [r["type"] for r in streamed] == ["flow"] * len(flows)  # written as seen, before the end
    keys = {(r["protocol"], r["dst"], r["dport"], r["uid"], r["comm"]) for r in streamed}
    assert len(keys) == len(flows)
    final = records(output.finish(flows, summary(connections, lost=2, map_full=1)))
    assert len(final) == 1 and final[0]["type"] == "summary"
    s = final[0]
    assert (s["connections"], s["events_lost"], s["map_full"], s["flows"]) == (18, 2, 1, len(flows))
    assert s["inputs"] == ["ebpf"] and s["attach"] == "kprobe tcp_v4_connect, tcp_v6_connect"
    assert {r["run"] for r in streamed} == {s["run"]}
    totals = {(t["dst"], t["dport"], t["uid"], t["comm"]): t["connections"] for t in s["totals"]}
    assert totals[("192.0.2.10", 443, 1000, "curl")] == 6  # 3 repeats, twice
    assert sum(totals.values()) == table.connections


def test_flow_record_carries_the_process_and_its_parents() -> None:
    stdout = io.StringIO()
    feed(make(stdout=stdout), sample_connections()[:1])
    (record,) = records(stdout.getvalue())
    assert record["process"]["cmdline"] == ["curl", "-sS", "https://example.org/"]
    assert record["process"]["parent"]["name"] == "bash"
    assert record["process"]["parent"]["parent"]["name"] == "sshd"
    assert record["process"]["attribution"] == "proc"
    assert (record["time"], record["time_utc"]) == (START + 1, "2026-01-01T00:00:01.000000Z")
    assert record["connections"] == 3 and record["family"] == "ipv4" and record["protocol"] == "tcp"


ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)))


@given(ANY_TEXT, ANY_TEXT, ANY_TEXT)
@settings(max_examples=150)
def test_hostile_text_stays_one_valid_line(name: str, argument: str, hostname: str) -> None:
    stdout = io.StringIO()
    hostile = proc(4242, name, 1000, name, [name, argument], parent=proc(1, argument, 0, "root"))
    c = conn(hostile, "2001:db8::1", 443, START)
    c = Connection(**{**c.__dict__, "hostname": hostname or None})
    feed(make(stdout=stdout), [c])
    text = stdout.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    (record,) = records(text)
    assert record["process"]["name"] == name
    assert record["process"]["cmdline"] == [name, argument]
    assert record["hostname"] == (hostname or None)


def test_file_is_appended_and_reopened_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    path.write_text("")  # a file kept from an earlier run is appended to
    output = make(f"json:file:{path}")
    connections = sample_connections()
    table = FlowTable()
    for c in connections[:3]:
        flow, is_new = table.add(c)
        output.connection(c, flow, is_new)
    rotated = tmp_path / "flows.jsonl.1"
    path.rename(rotated)  # what logrotate does before it sends SIGHUP
    output.reopen()
    for c in connections[3:]:
        flow, is_new = table.add(c)
        output.connection(c, flow, is_new)
    assert output.finish(list(table), summary(connections)) == ""  # nothing for stdout
    old, new = records(rotated.read_text()), records(path.read_text())
    assert [r["type"] for r in old] == ["flow"] * 3  # the first three were new flows
    assert [r["type"] for r in new] == ["flow"] * (len(table) - 3) + ["summary"]
    assert (path.stat().st_mode & 0o777) == 0o640


def test_unwritable_file_is_a_one_line_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot open json:file .*No such file or directory"):
        make(f"json:file:{tmp_path}/missing/flows.jsonl")


def test_cli_unwritable_file_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(CONSOLE), "trace", "-o", "json", "-O", f"json:file:{tmp_path}/missing/x.jsonl", "-t", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"egress-auditor: error: cannot open json:file '{tmp_path}/missing/x.jsonl': No such file or directory"
    ]
    assert result.stdout == ""


def test_a_flow_recovered_from_the_kernel_map_is_valid() -> None:
    # Sync recovers a flow whose event was lost: no pid, gid or source is known.
    stdout = io.StringIO()
    c = conn(proc(None, "curl", 1000, "alice", started=None), "192.0.2.10", 443, START)
    c = Connection(**{**c.__dict__, "pid": None, "gid": None, "src": None, "sport": None})
    feed(make(stdout=stdout), [c])
    (record,) = records(stdout.getvalue())
    assert (record["pid"], record["gid"], record["src"], record["sport"]) == (None, None, None, None)
    assert record["process"]["pid"] is None
    assert record["process"]["start_time"] is None and record["process"]["attribution"] == "name-only"
