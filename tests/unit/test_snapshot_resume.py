"""Snapshots and resume, through a whole TraceRun: a snapshot writes what a
stop at that moment would write (rule files rewritten, a checkpoint record
in the json file), SIGUSR1 asks for one at once; a run resumed from earlier
captures covers them in its rules and summary while its json records hold its
own part only, so reading the file back never counts twice; a run stopped
hard is resumed from its last checkpoint; a last line cut short is skipped
and repaired; a file that is not a capture is a one-line error.

A scripted input stands in for the kernel (connections and kernel counts at
given times); the same paths with the real tracer, real kills and a full disk
are in tests/kernel/test_service_trace.py."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flowdata import CURL, NTP, START, WGET, conn, summary

from egress_auditor.capture.flows import FlowTable, flow_key
from egress_auditor.capture.reader import read_captures, read_resume
from egress_auditor.display.live import PlainLog
from egress_auditor.inputs import InputBase, InputStats
from egress_auditor.model import Connection, Transport
from egress_auditor.plugins import select
from egress_auditor.trace import TraceRun

CONSOLE = Path(sys.executable).with_name("egress-auditor")
A = conn(CURL, "192.0.2.10", 443, START + 1)
B = conn(WGET, "192.0.2.11", 80, START + 2)
C = conn(NTP, "203.0.113.5", 123, START + 3, protocol=Transport.UDP)


class Script(InputBase):
    """Does each step once its time (seconds after open) has come: emit connections, or call a function;
    syncs report the kernel counts set so far."""

    name = "scripted"

    def __init__(self, steps: list[tuple[float, list[Connection] | Callable[[], None]]]) -> None:
        self.steps = sorted(steps, key=lambda s: s[0])
        self.counts: dict[Any, tuple[int, float]] = {}
        self.reported: dict[Any, int] = {}
        self.opened = 0.0

    def open(self) -> str:
        self.opened = time.monotonic()
        return "scripted"

    def poll(self, timeout_s: float, emit: Callable[[Connection], None]) -> None:
        time.sleep(timeout_s)
        while self.steps and time.monotonic() - self.opened >= self.steps[0][0]:
            _, action = self.steps.pop(0)
            if callable(action):
                action()
            else:
                for c in action:
                    emit(c)

    def sync(self, _emit: Any, on_count: Callable[..., None]) -> None:
        # As the eBPF input reports them: connects added since the last sync, beyond the one event.
        for key, (count, last) in self.counts.items():
            added = count - self.reported.get(key, 1)
            if added:
                self.reported[key] = count
                on_count(key, added, last)

    def stats(self) -> InputStats:
        return InputStats()

    def close(self) -> None:
        pass


class Known:
    """Every connection already carries its process."""

    lineage = None

    def attribute(self, c: Connection) -> Any:
        return c.process


def run(script: Script, outputs: list[str], options: list[str], seconds: float, **kwargs: Any) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    trace = TraceRun(
        inputs=[script],
        outputs=select("output", outputs, options, default="iptables").create(),
        display=PlainLog(stderr),
        duration=seconds,
        stdout=stdout,
        stderr=stderr,
        attributor=Known(),  # type: ignore[arg-type]
        **kwargs,
    )
    status = trace.run()
    return status, stdout.getvalue(), stderr.getvalue()


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_run_line(text: str) -> list[str]:
    """The run's length is in its header: a stop a moment later says a second more."""
    return [line for line in text.splitlines() if not line.lstrip("# ").startswith("run: ")]


def test_a_snapshot_writes_what_a_stop_at_that_moment_writes(tmp_path: Path) -> None:
    rules_dir, nft, capture = tmp_path / "rules", tmp_path / "egress.nft", tmp_path / "flows.jsonl"
    seen: dict[str, str] = {}

    def copy_files() -> None:
        seen.update({p.name: p.read_text() for p in (rules_dir / "rules.v4", rules_dir / "rules.v6", nft)})
        seen["json"] = capture.read_text()

    script = Script(
        [(0.0, [A, B]), (0.1, lambda: script.counts.update({flow_key(A): (7, START + 50)})), (1.3, copy_files)]
    )
    status, stdout, stderr = run(
        script,
        ["iptables", "nftables", "json"],
        [f"iptables:dir:{rules_dir}", "iptables:verbose:2", f"nftables:file:{nft}", f"json:file:{capture}"],
        1.8,
        snapshot_every=0.5,
    )
    assert status == 0, stderr
    assert "snapshot" not in stderr
    # Snapshots at 0.5 and 1.0 s wrote every file; nothing changed after them, so the stop wrote the same.
    for name, path in (("rules.v4", rules_dir / "rules.v4"), ("rules.v6", rules_dir / "rules.v6"), ("egress.nft", nft)):
        assert without_run_line(seen[name]) == without_run_line(path.read_text()), name
    assert "7 connection(s)" in seen["rules.v4"]
    checkpoints = [r for r in map(json.loads, seen["json"].splitlines()) if r["type"] == "checkpoint"]
    assert len(checkpoints) == 1  # at 0.5 s; at 1.0 s nothing had changed since
    final = records(capture)[-1]
    assert final["type"] == "summary" and checkpoints[-1]["totals"] == final["totals"]
    assert {(t["dst"], t["connections"]) for t in final["totals"]} == {("192.0.2.10", 7), ("192.0.2.11", 1)}
    # stdout gets the rules once, at the end.
    assert stdout.count("#!/bin/sh") == 1 and stdout.count("table inet egress_auditor {") == 1


def test_checkpoints_carry_the_counts_of_their_moment(tmp_path: Path) -> None:
    capture = tmp_path / "flows.jsonl"
    script = Script(
        [
            (0.0, [A]),
            (0.1, lambda: script.counts.update({flow_key(A): (5, START + 10)})),
            (0.8, lambda: script.counts.update({flow_key(A): (9, START + 20)})),
        ]
    )
    status, _, stderr = run(script, ["json"], [f"json:file:{capture}"], 1.2, snapshot_every=0.5)
    assert status == 0, stderr
    counts = [(r["type"], r["totals"][0]["connections"]) for r in records(capture) if r["type"] != "flow"]
    assert counts == [("checkpoint", 5), ("checkpoint", 9), ("summary", 9)]


def test_sigusr1_writes_a_snapshot_at_once(tmp_path: Path) -> None:
    nft = tmp_path / "egress.nft"
    found: list[bool] = []
    script = Script(
        [
            (0.0, [A]),
            (0.2, lambda: found.append(nft.exists())),
            (0.3, lambda: os.kill(os.getpid(), signal.SIGUSR1)),
            (0.6, lambda: found.append(nft.exists() and "192.0.2.10" in nft.read_text())),
        ]
    )
    status, _, stderr = run(script, ["nftables"], [f"nftables:file:{nft}"], 0.9)
    assert status == 0, stderr
    assert found == [False, True]


def test_a_failed_snapshot_is_one_note_and_the_run_goes_on(tmp_path: Path, capsys: Any) -> None:
    rules_dir = tmp_path / "rules"

    def block() -> None:  # the directory gone and a file in its way: no temporary file can be made there
        shutil.rmtree(rules_dir)
        rules_dir.write_text("in the way")

    script = Script([(0.0, [A]), (0.7, block), (0.8, [B])])
    status, stdout, stderr = run(script, ["iptables"], [f"iptables:dir:{rules_dir}"], 1.3, snapshot_every=0.5)
    assert status == 0
    notes = [line for line in stderr.splitlines() if "snapshot of output iptables not written" in line]
    assert len(notes) == 1, stderr
    assert "192.0.2.11" in stdout  # the run went on, and its rules still reached stdout
    assert f"iptables:dir {rules_dir} not written" in capsys.readouterr().err  # at the stop too


def first_run(path: Path) -> None:
    script = Script([(0.0, [A, B]), (0.1, lambda: script.counts.update({flow_key(A): (3, START + 30)}))])
    status, _, stderr = run(script, ["json"], [f"json:file:{path}"], 0.5)
    assert status == 0, stderr


def test_a_resumed_run_covers_both_and_its_records_only_its_own(tmp_path: Path) -> None:
    capture = tmp_path / "flows.jsonl"
    first_run(capture)
    resumed = read_resume([str(capture)])
    assert resumed is not None and resumed.runs == 1
    later_a = conn(CURL, "192.0.2.10", 443, START + 100)
    script = Script([(0.0, [later_a, C])])
    status, stdout, stderr = run(
        script, ["json", "iptables"], [f"json:file:{capture}", "iptables:verbose:1"], 0.5, resumed=resumed
    )
    assert status == 0, stderr
    # The rules: A 3 + 1, B 1, C 1; first seen from the first run, last from this one.
    assert (
        "TCP to 192.0.2.10 port 443: 4 connection(s), first 2026-01-01T00:00:01Z, last 2026-01-01T00:01:40Z" in stdout
    )
    assert "TCP to 192.0.2.11 port 80: 1 connection(s)" in stdout and "UDP to 203.0.113.5 port 123" in stdout
    assert "connections: 6," in stdout and "resumed 2 flows of 1 earlier run(s)" in stdout
    assert "with 2 flows of 1 earlier run(s) resumed" in stderr
    # The new run's summary holds its own part; the file read back adds the runs, counting nothing twice.
    summaries = [r for r in records(capture) if r["type"] == "summary"]
    assert len(summaries) == 2 and summaries[1]["connections"] == 2
    assert {(t["dst"], t["connections"]) for t in summaries[1]["totals"]} == {("192.0.2.10", 1), ("203.0.113.5", 1)}
    back = read_captures([str(capture)])
    assert {(str(f.key.dst), f.connections) for f in back.flows} == {
        ("192.0.2.10", 4),
        ("192.0.2.11", 1),
        ("203.0.113.5", 1),
    }
    assert back.summary.connections == 6


def test_a_run_stopped_hard_resumes_from_its_last_checkpoint_and_a_cut_line_is_skipped(
    tmp_path: Path, capsys: Any
) -> None:
    capture = tmp_path / "flows.jsonl"
    script = Script([(0.0, [A]), (0.1, lambda: script.counts.update({flow_key(A): (6, START + 30)}))])
    assert run(script, ["json"], [f"json:file:{capture}"], 0.8, snapshot_every=0.3)[0] == 0
    lines = capture.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["type"] == "summary" and json.loads(lines[-2])["type"] == "checkpoint"
    # As a SIGKILL in the middle of a write leaves it: no summary, half a record at the end.
    capture.write_text("".join(lines[:-1]) + lines[-1][:40])
    resumed = read_resume([str(capture)])
    assert resumed is not None and [f.connections for f in resumed.flows] == [6]
    assert any("last line cut short (40 bytes), skipped" in n for n in resumed.notes)
    assert any("counts as of its last checkpoint" in n for n in resumed.notes)
    # The next run appends to the same file: the cut line is removed first, so the file stays a capture.
    status, _, stderr = run(Script([(0.0, [A])]), ["json"], [f"json:file:{capture}"], 0.4, resumed=resumed)
    assert status == 0, stderr
    assert "removed a last line cut short (40 bytes" in capsys.readouterr().err
    back = read_captures([str(capture)])
    assert [f.connections for f in back.flows] == [7] and not any("cut short" in n for n in back.notes)


def test_a_missing_resume_file_is_a_fresh_start(tmp_path: Path, capsys: Any) -> None:
    assert read_resume([str(tmp_path / "none.jsonl")]) is None
    assert "nothing to resume from it" in capsys.readouterr().err


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CONSOLE), *args], capture_output=True, text=True, timeout=60)


def test_resuming_from_what_is_not_a_capture_is_one_line_naming_file_and_line(tmp_path: Path) -> None:
    capture = tmp_path / "flows.jsonl"
    first_run(capture)
    good = capture.read_text()
    not_capture, other_version = tmp_path / "notes.txt", tmp_path / "v3.jsonl"
    not_capture.write_text(good + "hello world\n" + good)
    other_version.write_text(json.dumps({"version": 3, "type": "flow"}) + "\n")
    for path, message in (
        (not_capture, f"{not_capture}:{good.count(chr(10)) + 1}: not JSON"),
        (other_version, f"{other_version}:1: record version 3; this egress-auditor reads versions 1 and 2"),
    ):
        done = cli("trace", "--no-live", "--resume", str(path))
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"egress-auditor: error: cannot resume: {message}"), lines


def test_a_record_the_file_system_refuses_half_of_is_cut_back_off(tmp_path: Path) -> None:
    """A real short write: the file size limit (RLIMIT_FSIZE) lets 10 bytes of the record through, then EFBIG."""
    capture = tmp_path / "flows.jsonl"
    output = select("output", ["json"], [f"json:file:{capture}"], default="json").create()[0]
    table = FlowTable()
    flow, is_new = table.add(A)
    output.connection(A, flow, is_new)
    before = capture.read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 10, limits[1]))
        flow, is_new = table.add(B)
        with pytest.raises(OSError):
            output.connection(B, flow, is_new)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert capture.read_bytes() == before
    output.snapshot(list(table), summary([A, B]))  # with room again, whole records follow
    assert [r["type"] for r in records(capture)] == ["flow", "checkpoint"]


def test_no_checkpoint_while_nothing_was_seen_since_the_last(tmp_path: Path) -> None:
    capture = tmp_path / "flows.jsonl"
    output = select("output", ["json"], [f"json:file:{capture}"], default="json").create()[0]
    table = FlowTable()
    output.snapshot([], summary([]))  # nothing yet
    flow, is_new = table.add(A)
    output.connection(A, flow, is_new)
    for _ in range(3):
        output.snapshot(list(table), summary([A]))
    table.add(A)
    output.snapshot(list(table), summary([A, A]))
    assert [(r["type"], r["connections"]) for r in records(capture) if r["type"] == "checkpoint"] == [
        ("checkpoint", 1),
        ("checkpoint", 2),
    ]


def test_a_checkpoint_lists_what_changed_since_the_last_and_reads_back_whole(tmp_path: Path) -> None:
    capture = tmp_path / "flows.jsonl"
    output = select("output", ["json"], [f"json:file:{capture}"], default="json").create()[0]
    table = FlowTable()
    old, busy = conn(CURL, "192.0.2.10", 443, START), conn(WGET, "192.0.2.11", 80, START + 100)
    for c in (old, busy):
        flow, is_new = table.add(c)
        output.connection(c, flow, is_new)
    output.snapshot(list(table), summary([old, busy]))
    table.set_kernel_count(flow_key(busy), 5, START + 200)
    output.snapshot(list(table), summary([old, busy, busy]))
    checkpoints = [r for r in records(capture) if r["type"] == "checkpoint"]
    assert [len(r["totals"]) for r in checkpoints] == [2, 1] and checkpoints[1]["flows"] == 2
    assert "totals_since" not in checkpoints[0] and checkpoints[1]["totals_since"] == START + 100 - 60
    # Stopped hard here: every flow comes back with its latest count.
    back = read_captures([str(capture)])
    assert sorted((f.key.comm, f.connections) for f in back.flows) == [("curl", 1), ("wget", 5)]
    # A rotated file starts again with every flow.
    capture.rename(tmp_path / "flows.jsonl.1")
    output.reopen()
    table.set_kernel_count(flow_key(busy), 6, START + 300)
    output.snapshot(list(table), summary([old, busy, busy, busy]))
    assert [len(r["totals"]) for r in records(capture)] == [2]
