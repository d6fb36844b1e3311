"""JSON records of a run, shared by the json and loki outputs and read back by
capture/reader.py: one `flow` record per new flow, a `checkpoint` record at each
snapshot (a summary as of then), one `summary` record at the end.

The format is versioned; egress_auditor/capture/schema/flow-v2.json describes it. Version 1
named the connection counts `repeats`, `count` and `connects`, and wrote 0 for an unknown pid,
tid, cgroup id or source port: `upgrade()` reads it as version 2.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from typing import Any

from egress_auditor.model import Connection, Flow, Process, Summary

VERSION = 2
READABLE = (1, 2)
SCHEMA_FILE = "flow-v2.json"


def schema(version: int = VERSION) -> dict[str, Any]:
    """The JSON Schema of a version, as shipped inside the package."""
    return json.loads(resources.files("egress_auditor.capture").joinpath("schema", f"flow-v{version}.json").read_text())


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """A record of any readable version as version 2 writes it (the same record when it is one)."""
    if record.get("version") != 1:
        return record
    record = {**record, "version": VERSION}
    if "repeats" in record:
        record["connections"] = record.pop("repeats")
    if "connects" in record:
        record["connections"] = record.pop("connects")
    for name in ("pid", "tid", "cgroup_id", "sport"):
        if record.get(name) == 0:
            record[name] = None
    if isinstance(record.get("process"), dict):
        record["process"] = _upgrade_process(record["process"])
    if isinstance(record.get("totals"), list):
        record["totals"] = [_upgrade_totals(t) for t in record["totals"]]
    return record


def _upgrade_process(process: dict[str, Any]) -> dict[str, Any]:
    parent = process.get("parent")
    return {
        **process,
        "pid": process.get("pid") or None,
        "parent": _upgrade_process(parent) if isinstance(parent, dict) else parent,
    }


def _upgrade_totals(totals: Any) -> Any:
    if not isinstance(totals, dict) or "count" not in totals:
        return totals
    upgraded = {**totals, "connections": totals["count"]}
    del upgraded["count"]
    return upgraded


def utc(seconds: float) -> str:
    micros = round(seconds * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(micros // 1_000_000)) + f".{micros % 1_000_000:06d}Z"


def process_record(process: Process) -> dict[str, Any]:
    return {
        "pid": process.pid,
        "name": process.name,
        "uid": process.uid,
        "user": process.user,
        "gid": process.gid,
        "exe": process.exe,
        "cmdline": list(process.cmdline),
        "start_time": process.start_time,
        "attribution": process.attribution.value,
        "cgroup": process.cgroup,
        "service": process.service,
        "parent": process_record(process.parent) if process.parent is not None else None,
    }


def flow_record(conn: Connection, run: str, host: str) -> dict[str, Any]:
    """The connection that made a flow new, with its process."""
    return {
        "version": VERSION,
        "type": "flow",
        "run": run,
        "host": host,
        "time": conn.time,
        "time_utc": utc(conn.time),
        "input": conn.input,
        "protocol": conn.protocol.name.lower(),
        "family": conn.family.label.lower(),
        "src": str(conn.src) if conn.src is not None else None,
        "sport": conn.sport,
        "dst": str(conn.dst),
        "dport": conn.dport,
        "hostname": conn.hostname,
        "pid": conn.pid,
        "tid": conn.tid,
        "uid": conn.uid,
        "gid": conn.gid,
        "comm": conn.comm,
        "cgroup_id": conn.cgroup_id,
        "connections": conn.connections,
        "process": process_record(conn.process),
    }


def drift_record(conn: Connection, run: str, host: str) -> dict[str, Any]:
    """A new flow that the baseline does not cover: the flow record, typed drift."""
    return {**flow_record(conn, run, host), "type": "drift"}


def totals_record(flow: Flow) -> dict[str, Any]:
    """A flow's final count and times, keyed as the flow records are."""
    key = flow.key
    record = {
        "protocol": key.protocol.name.lower(),
        "family": key.family.label.lower(),
        "dst": str(key.dst),
        "dport": key.dport,
        "uid": key.uid,
        "comm": key.comm,
        "connections": flow.connections,
        "first_seen": flow.first_seen,
        "last_seen": flow.last_seen,
        "hostnames": sorted(flow.hostnames),
        "inputs": sorted(flow.inputs),
    }
    if key.prefix:
        record["prefix"] = key.prefix  # held as dst/prefix past the flow cap
    return record


def summary_record(
    flows: list[Flow], summary: Summary, run: str, kind: str = "summary", totals_since: float | None = None
) -> dict[str, Any]:
    """The end of a run, or with kind "checkpoint" the same as of a snapshot while it goes on.
    With totals_since, `totals` holds only the flows seen since then (the checkpoints before hold the rest)."""
    record = {
        "version": VERSION,
        "type": kind,
        "run": run,
        "host": summary.host,
        "started": summary.started,
        "ended": summary.ended,
        "started_utc": utc(summary.started),
        "duration": round(summary.ended - summary.started, 6),
        "inputs": list(summary.inputs),
        "attach": summary.attach,
        "connections": summary.connections,
        "events_lost": summary.events_lost,
        "map_full": summary.map_full,
        "flows": len(flows),
        "totals": [totals_record(f) for f in flows if totals_since is None or f.last_seen >= totals_since],
    }
    if totals_since is not None:
        record["totals_since"] = totals_since
    return record


def line(record: dict[str, Any]) -> str:
    """One line of ASCII: names from processes can neither end it nor steer a terminal."""
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"
