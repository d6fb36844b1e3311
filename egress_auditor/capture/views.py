"""What the outputs are given at a stop or a snapshot: this run's own flows and summary, and
what the rules cover (the resumed runs merged in; with a baseline, only what it does not cover).

Record streams (json, loki) write each run's own part, as readers merge runs; the firewall
outputs write rules for every run resumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from egress_auditor.capture.drift import DriftWatch
from egress_auditor.capture.reader import Capture, merge_flows
from egress_auditor.model import Flow, Summary


class View(NamedTuple):
    """What one output is given: `output.finish(*view)`."""

    flows: list[Flow]
    summary: Summary


@dataclass(frozen=True)
class Views:
    own: View  # this run's part: what the record streams write
    rules: View  # every run resumed, less what the baseline covers: what the firewall outputs write
    everything: list[Flow]  # every flow, resumed runs' included, before a baseline took any out
    drifted: list[Flow] | None  # with a baseline, what it does not cover

    def for_sink(self, sink: Any) -> View:
        return self.own if sink.per_run else self.rules


def run_views(flows: list[Flow], summary: Summary, resumed: Capture | None, drift: DriftWatch | None) -> Views:
    """The views of this run's flows and summary, with the earlier runs it resumed and the baseline."""
    own = View(flows, summary)
    everything, merged = flows, summary
    if resumed is not None:
        everything, merged = merge_flows([*resumed.flows, *flows]), _merged_summary(summary, resumed)
    if drift is None:
        return Views(own, View(everything, merged), everything, None)
    # Decided on the final flows: a DNS name applied after the connect can still cover it.
    drifted = drift.drifted(everything)
    merged = dataclasses.replace(merged, notes=[*merged.notes, (
        f"drift: {len(drifted)} of {len(everything)} flows not covered by the baseline "
        f"{drift.source}; the rules below allow those alone"
    )])  # fmt: skip
    return Views(own, View(drifted, merged), everything, drifted)


def _merged_summary(summary: Summary, resumed: Capture) -> Summary:
    earlier = resumed.summary
    return Summary(
        started=min(earlier.started, summary.started),
        ended=summary.ended,
        host=summary.host,
        inputs=sorted({*summary.inputs, *earlier.inputs}),
        attach=f"{summary.attach}; resumed {len(resumed.flows)} flows of {resumed.runs} earlier run(s)",
        connections=summary.connections + earlier.connections,
        events_lost=summary.events_lost + earlier.events_lost,
        map_full=summary.map_full + earlier.map_full,
        notes=summary.notes,
    )
