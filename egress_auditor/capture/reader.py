"""Saved captures read back into flows: the JSON Lines that `-o json` writes
(or the same lines exported from Loki), from one or many hosts and runs.

Each run is rebuilt on its own (its flow records, then its summary's final
counts, or its last checkpoint's if it was killed), then runs are merged flow
by flow. A record seen twice (a file given twice, a file and a Loki export of
the same run) counts once. A last line cut short (a crash in the middle of a
write) is skipped with a note.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egress_auditor.attribution.redact import redact_process
from egress_auditor.capture.flows import FlowTable, network_key
from egress_auditor.capture.records import READABLE, VERSION, upgrade, utc
from egress_auditor.errors import UsageError
from egress_auditor.model import (
    Attribution,
    Connection,
    Evidence,
    Family,
    FewMap,
    Flow,
    FlowKey,
    Process,
    Summary,
    Transport,
)
from egress_auditor.rules.provenance import STARTUP_S

_FAMILIES = {"ipv4": Family.IPV4, "ipv6": Family.IPV6}


class CaptureError(UsageError):
    """A capture that is not what `-o json` writes: names the file and line; bad input, so status 2."""


@dataclass
class Run:
    id: str
    host: str
    table: FlowTable = field(default_factory=FlowTable)
    summary: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None  # the latest, without its totals: for a run that never wrote its summary
    counted: set[FlowKey] = field(default_factory=set)  # flows with totals of their own, in any record
    networks: set[FlowKey] = field(default_factory=set)  # of those, networks held past the run's flow cap


@dataclass
class Capture:
    flows: list[Flow]
    summary: Summary
    runs: int
    notes: list[str]  # what the reader could not vouch for, for stderr


def _process(record: dict[str, Any]) -> Process:
    parent = record["parent"]
    return Process(
        pid=_optional_int(record["pid"]),
        name=str(record["name"]),
        uid=record["uid"],
        user=record["user"],
        exe=record["exe"],
        cmdline=tuple(str(a) for a in record["cmdline"]),
        start_time=record["start_time"],
        parent=_process(parent) if parent is not None else None,
        attribution=Attribution(record["attribution"]),
        gid=record["gid"],
        cgroup=record["cgroup"],
        service=record["service"],
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _key(record: dict[str, Any]) -> FlowKey:
    return FlowKey(
        Transport[str(record["protocol"]).upper()],
        _FAMILIES[record["family"]],
        ipaddress.ip_address(record["dst"]),
        int(record["dport"]),
        int(record["uid"]),
        str(record["comm"]),
        int(record.get("prefix") or 0),
    )


def connection(record: dict[str, Any]) -> Connection:
    """The Connection a flow record was written from."""
    key = _key(record)
    src = record["src"]
    return Connection(
        time=float(record["time"]),
        protocol=key.protocol,
        family=key.family,
        src=ipaddress.ip_address(src) if src is not None else None,
        sport=_optional_int(record["sport"]),
        dst=key.dst,
        dport=key.dport,
        pid=_optional_int(record["pid"]),
        uid=key.uid,
        gid=_optional_int(record["gid"]),
        comm=key.comm,
        input=str(record["input"]),
        process=_process(record["process"]),
        connections=int(record["connections"]),
        tid=_optional_int(record["tid"]),
        cgroup_id=_optional_int(record["cgroup_id"]),
        hostname=record["hostname"],
    )


def _apply_totals(run: Run, summary: dict[str, Any]) -> None:
    """Final counts and times; a flow whose own record never arrived (a Loki
    buffer drop) is still rebuilt, with only what its totals say."""
    for totals in summary["totals"]:
        key = _key(totals)
        run.counted.add(key)
        if key.prefix:
            run.networks.add(key)
        flow = run.table.get(key)
        if flow is None:
            process = Process(pid=None, name=key.comm, uid=key.uid, attribution=Attribution.NAME_ONLY)
            first = float(totals["first_seen"])
            flow = run.table.put(Flow(key, first, first, processes=FewMap([((None, None), process)])))
            if not totals["inputs"]:
                flow.add_inputs(("capture",))
        run.table.set_kernel_count(key, int(totals["connections"]), float(totals["last_seen"]))
        flow.add_hostnames(str(h) for h in totals["hostnames"])
        flow.add_inputs(str(i) for i in totals["inputs"])


def _fold_into_networks(run: Run) -> None:
    """A flow record with no totals of its own, inside a network the run held past its flow cap,
    is that network's first member: its count is in the network's. Once a run is read whole."""
    table, networks = run.table, run.networks
    lengths = {(k.prefix, k.family) for k in networks}
    for flow in list(table):
        if flow.key in run.counted or flow.key.prefix:
            continue
        for length, family in lengths:
            if family is not flow.key.family:
                continue
            holder = table.get(network_key(flow.key, length, length))
            if holder is not None and holder.key in networks:
                for pkey, process in flow.processes.items():
                    holder.processes.setdefault(pkey, process)
                table.discard(flow.key)
                break


def _lines(source: str) -> Iterator[tuple[int, str]]:
    if source == "-":
        yield from enumerate(sys.stdin, 1)
        return
    try:
        with Path(source).open(encoding="utf-8", errors="surrogateescape") as handle:
            yield from enumerate(handle, 1)
    except OSError as exc:
        raise UsageError(f"cannot read capture {source!r}: {exc.strerror}") from None


def _read(source: str, runs: dict[str, Run], notes: list[str]) -> int:
    count = 0
    for number, text in _lines(source):
        if not text.strip():
            continue
        where = f"{'stdin' if source == '-' else source}:{number}"
        try:
            record = json.loads(text)
        except ValueError as exc:
            if not text.endswith("\n"):  # only the last line can lack its newline: a write cut short
                notes.append(f"{where}: last line cut short ({len(text)} bytes), skipped")
                continue
            raise CaptureError(f"{where}: not JSON ({exc.msg}); expected lines written by -o json") from None
        if not isinstance(record, dict) or record.get("version") not in READABLE:
            version = record.get("version") if isinstance(record, dict) else None
            readable = " and ".join(str(v) for v in READABLE)
            raise CaptureError(f"{where}: record version {version!r}; this egress-auditor reads versions {readable}")
        written = record["version"]
        record = upgrade(record)
        try:
            run = runs.setdefault(record["run"], Run(record["run"], str(record["host"])))
            if record["type"] == "flow":
                conn = connection(record)
                if (key := _key(record)) not in run.table:  # each flow has one record per run: more is a repeat
                    run.table.add(conn)
                else:
                    run.table.get(key).processes.setdefault(  # type: ignore[union-attr]
                        (conn.process.pid, conn.process.start_time), conn.process
                    )
            elif record["type"] == "summary":
                run.summary = record
            elif record["type"] == "drift":
                pass  # the same connection's flow record carries it
            elif record["type"] == "checkpoint":
                # Applied as read: a checkpoint lists what changed since the one before, and
                # every flow it lists had its flow record earlier in the file.
                _apply_totals(run, record)
                if run.checkpoint is None or float(record["ended"]) >= float(run.checkpoint["ended"]):
                    run.checkpoint = {**record, "totals": []}
            else:
                raise ValueError(f"unknown record type {record['type']!r}")
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise CaptureError(f"{where}: not a valid version-{written} record: {detail}") from None
        count += 1
    return count


def _started(run: Run) -> float:
    record = run.summary or run.checkpoint
    if record is not None:
        return float(record["started"])
    return min((f.first_seen for f in run.table), default=0.0)


def _with_evidence(runs: Iterable[Run], always: bool) -> Iterator[Flow]:
    """Each run's flows, each with where it was seen (its host, its run, whether only at start-up)
    when there are several runs to weigh; one run's rules read as that run wrote them."""
    runs = list(runs)
    all_hosts = len({r.host for r in runs})
    for run in runs:
        started = _started(run)
        for flow in run.table:
            if len(runs) == 1 and not always:
                yield flow
                continue
            startup = flow.last_seen - started < STARTUP_S
            flow.evidence = Evidence(frozenset({run.host}), frozenset({run.id}), startup, all_hosts)
            yield flow


def merge_flows(flows: Iterable[Flow]) -> list[Flow]:
    """One flow per key, counts added, times and processes of all; sorted. The flows given are not changed."""
    merged: dict[FlowKey, Flow] = {}
    for flow in flows:
        into = merged.get(flow.key)
        if into is None:
            merged[flow.key] = Flow(
                flow.key, flow.first_seen, flow.last_seen, flow.connections,
                dict(flow.processes), flow.inputs, flow.hostnames, flow.evidence,
            )  # fmt: skip
            continue
        if flow.evidence is not None:
            into.evidence = flow.evidence if into.evidence is None else into.evidence | flow.evidence
        into.first_seen = min(into.first_seen, flow.first_seen)
        into.last_seen = max(into.last_seen, flow.last_seen)
        into.connections += flow.connections
        for key, process in flow.processes.items():
            into.processes.setdefault(key, process)
        into.add_inputs(flow.inputs)
        into.add_hostnames(flow.hostnames)
    return [merged[k] for k in sorted(merged)]


def read_resume(sources: Iterable[str], redact: bool = True) -> Capture | None:
    """The captures a run carries on from; a file not there yet (a service's first start) is a note,
    and None if no file holds a run."""
    present = []
    notes = []
    for source in sources:
        if Path(source).exists():
            present.append(source)
        else:
            notes.append(f"{source}: no capture yet, nothing to resume from it")
    capture = read_captures(present, redact) if present else None
    if capture is None or capture.runs == 0:
        for note in notes + (capture.notes if capture else []):
            print(f"egress-auditor: {note}", file=sys.stderr)
        return None
    capture.notes[:0] = notes
    return capture


def read_captures(sources: Iterable[str], redact: bool = True, evidence: bool = False) -> Capture:
    """Flows and one summary from every run in the given captures ("-": stdin); with redact,
    command lines lose their secrets (a capture written with --raw-cmdlines, or by an older version);
    each flow carries where it was seen when there are several runs, or always with `evidence`."""
    runs: dict[str, Run] = {}
    notes: list[str] = []
    for source in sources:
        if _read(source, runs, notes) == 0:
            notes.append(f"{source}: no records")
    for run in runs.values():
        if run.summary is None and run.checkpoint is not None:
            run.summary = run.checkpoint
            notes.append(
                f"run {run.id} on {run.host} has no summary (it was stopped hard): "
                f"counts as of its last checkpoint, {utc(float(run.checkpoint['ended']))}"
            )
        if run.summary is not None:
            try:
                _apply_totals(run, run.summary)
            except (KeyError, ValueError, TypeError) as exc:
                raise CaptureError(
                    f"run {run.id} on {run.host}: summary not a valid version-{VERSION} record: {exc}"
                ) from None
        else:
            notes.append(
                f"run {run.id} on {run.host} has no summary (the capture ends early): "
                "counts and last-seen times are those of each flow's first record"
            )
        if run.networks:
            _fold_into_networks(run)
    flows = merge_flows(_with_evidence(runs.values(), evidence))
    if redact:
        for flow in flows:
            flow.processes = {key: redact_process(p) for key, p in flow.processes.items()}
    return Capture(flows, _summary(runs), len(runs), notes)


def _summary(runs: dict[str, Run]) -> Summary:
    if not runs:
        return Summary(started=0.0, ended=0.0, host="none", inputs=[], attach="no captured runs")
    starts, ends, inputs, attach = [], [], set(), {}
    connections = lost = map_full = 0
    for run in runs.values():
        times = [t for f in run.table for t in (f.first_seen, f.last_seen)]
        s = run.summary
        starts.append(float(s["started"]) if s else min(times, default=0.0))
        ends.append(float(s["ended"]) if s else max(times, default=0.0))
        inputs.update(s["inputs"] if s else {i for f in run.table for i in f.inputs})
        attach.setdefault(f"{run.host}: {s['attach'] if s else 'unknown (no summary)'}", None)
        connections += int(s["connections"]) if s else run.table.connections
        lost += int(s["events_lost"]) if s else 0
        map_full += int(s["map_full"]) if s else 0
    many = len(runs) > 1
    return Summary(
        started=min(starts),
        ended=max(ends),
        host=", ".join(sorted({r.host for r in runs.values()})),
        inputs=sorted(inputs),
        attach=(f"{len(runs)} runs from captures: " if many else "from a capture: ") + "; ".join(attach),
        connections=connections,
        events_lost=lost,
        map_full=map_full,
    )
