"""A trace run built from its parsed options: the captures it resumes and the baseline read,
the plugins made, the display chosen, and a cgroup v2 hierarchy mounted for the run where it
needs one and none is visible (`ip netns exec` remounts /sys).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from rich.console import Console

from egress_auditor.attribution.cgroups import cgroup2_where_hidden
from egress_auditor.attribution.lineage_tracer import LineageTracer
from egress_auditor.capture.baseline import Baseline
from egress_auditor.capture.drift import DriftWatch, strictest
from egress_auditor.capture.flows import FLOW_CAP, FlowTable
from egress_auditor.capture.reader import Capture, CaptureError, read_captures, read_resume
from egress_auditor.command import AuditedCommand, invoking_user
from egress_auditor.display.live import Display, LiveTable, PlainLog
from egress_auditor.errors import UsageError
from egress_auditor.plugins import Selection
from egress_auditor.trace import TraceRun


@dataclass(frozen=True)
class TraceOptions:
    """What `trace` was asked for, parsed from its command line."""

    inputs: Selection
    outputs: Selection
    duration: float | None = None
    count: int | None = None
    live: bool = True  # the live table, where stderr is a terminal and no command shares it
    summary_every: float | None = None
    lineage: bool = True
    baselines: Sequence[str] = ()
    redact: bool = True
    snapshot_every: float | None = None
    resume: Sequence[str] = ()
    flow_cap: int = FLOW_CAP
    command: Sequence[str] = ()


@contextlib.contextmanager
def build_trace_run(options: TraceOptions) -> Iterator[TraceRun]:
    """The run the options ask for, made and used inside the `with` block (a cgroup v2 mount made for it
    lasts as long); bad captures to resume or compare with are UsageErrors."""
    resumed = _resumed(options)
    drift = _drift(options)
    table = FlowTable(options.flow_cap)
    display = _display(options, table)
    # Before anything looks for the hierarchy or starts a thread: the mount is this thread's view.
    with cgroup2_where_hidden() if _needs_cgroup2(options) else contextlib.nullcontext() as mounted:
        if mounted is not None:
            print(
                f"egress-auditor: no cgroup v2 mount here (ip netns exec remounts /sys): mounted one at "
                f"{mounted} for this run, seen by no other process",
                file=sys.stderr,
            )
        yield TraceRun(
            inputs=options.inputs.create(),
            outputs=options.outputs.create(),
            display=display,
            duration=options.duration,
            count=options.count,
            table=table,
            lineage=LineageTracer() if options.lineage else None,
            command=AuditedCommand(options.command, user=invoking_user()) if options.command else None,
            drift=drift,
            redact=options.redact,
            snapshot_every=options.snapshot_every,
            resumed=resumed,
            summary_every=options.summary_every,
        )


def _resumed(options: TraceOptions) -> Capture | None:
    try:
        resumed = read_resume(options.resume, redact=options.redact) if options.resume else None
    except CaptureError as exc:
        raise UsageError(f"cannot resume: {exc}") from None
    for note in resumed.notes if resumed else []:
        print(f"egress-auditor: {note}", file=sys.stderr)
    return resumed


def _drift(options: TraceOptions) -> DriftWatch | None:
    if not options.baselines:
        return None
    known = read_captures(options.baselines)
    for note in known.notes:
        print(f"egress-auditor: baseline: {note}", file=sys.stderr)
    scope = strictest(str(o.get("scope", "none")) for o in options.outputs.chosen.values())
    return DriftWatch(Baseline.of(known.flows), scope, ", ".join(options.baselines))


def _display(options: TraceOptions, table: FlowTable) -> Display:
    console = Console(stderr=True)
    # The command's own output shares the terminal: one line per flow reads better than a redrawn table.
    plain = not options.live or bool(options.command) or not console.is_terminal
    return PlainLog(sys.stderr) if plain else LiveTable(console, table)


def _needs_cgroup2(options: TraceOptions) -> bool:
    """The eBPF input's hooks, the netfilter inputs' DNS program and a command's cgroup use cgroup v2."""
    return bool(options.command) or any(
        name == "ebpf" or chosen.get("dns") == "auto" for name, chosen in options.inputs.chosen.items()
    )
