"""`egress-auditor diff` as text for a code review, or as one JSON object."""

from __future__ import annotations

import json
from dataclasses import dataclass

from egress_auditor.capture.baseline import Diff, describe, diff, evidence
from egress_auditor.capture.reader import Capture
from egress_auditor.escape import terminal_text


@dataclass
class Rendered:
    diff: Diff
    text: str


def _side(capture: Capture) -> str:
    return f"{capture.runs} run(s) on {capture.summary.host}"


def render_text(before: Capture, after: Capture) -> Rendered:
    changes = diff(before.flows, after.flows)
    lines = [
        f"{len(changes.added)} added, {len(changes.gone)} gone, {len(changes.readdressed)} known name(s) "
        f"at a new address; old: {_side(before)}; new: {_side(after)}"
    ]
    lines += [f"+ {describe(rule)}" for rule in changes.added]
    lines += [f"- {describe(rule)}" for rule in changes.gone]
    for rule, names in changes.readdressed:
        was = "; ".join(f"{name} was {', '.join(map(str, old))}" for name, old in names)
        lines.append(f"~ {describe(rule)} ({was})")
    # Names and processes come from the captured hosts: escaped before they reach a terminal.
    safe = (terminal_text(line).encode("utf-8", "backslashreplace").decode("utf-8") for line in lines)
    return Rendered(changes, "".join(line + "\n" for line in safe))


def render_json(before: Capture, after: Capture) -> Rendered:
    changes = diff(before.flows, after.flows)
    record = {
        "old": {"runs": before.runs, "hosts": before.summary.host},
        "new": {"runs": after.runs, "hosts": after.summary.host},
        "added": [evidence(rule) for rule in changes.added],
        "gone": [evidence(rule) for rule in changes.gone],
        "readdressed": [
            {**evidence(rule), "known_as": [{"name": n, "old": [str(a) for a in old]} for n, old in names]}
            for rule, names in changes.readdressed
        ],
    }
    return Rendered(changes, json.dumps(record, ensure_ascii=True, indent=2) + "\n")
