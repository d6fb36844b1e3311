"""The live header names each attach path in a few words; the rules' header keeps
the detail. A real eBPF input is loaded and attached for a one-second run."""

from __future__ import annotations

import io
from typing import Any

from egress_auditor.inputs.ebpf import PLUGIN, SHORT_PATHS, EbpfInput
from egress_auditor.trace import TraceRun


class Screen:
    """Stands in for the rich live table: keeps what it was asked to show."""

    name = "screen"

    def __init__(self) -> None:
        self.shown: list[dict[str, str]] = []

    def start(self, status: dict[str, str]) -> None:
        self.shown.append(status)

    def connection(self, *_args: Any) -> None:
        pass

    def drift(self, *_args: Any) -> None:
        pass

    def refresh(self, status: dict[str, str]) -> None:
        self.shown.append(status)

    def stop(self) -> None:
        pass


def test_the_header_names_each_path_in_a_few_words() -> None:
    from egress_auditor.outputs.iptables import PLUGIN as IPTABLES

    screen, stdout = Screen(), io.StringIO()
    source = EbpfInput(PLUGIN.defaults())
    run = TraceRun(
        inputs=[source],
        outputs=[IPTABLES.factory(IPTABLES.defaults())],
        display=screen,
        duration=1,
        stdout=stdout,
        stderr=io.StringIO(),
    )
    assert run.run() == 0
    assert source.plan is not None
    paths = [SHORT_PATHS[source.plan.tcp_hook], SHORT_PATHS[source.plan.udp]]
    expected = " + ".join([*dict.fromkeys(paths), "DNS"])
    assert len(expected) <= 40, expected
    assert screen.shown and {s["attach"] for s in screen.shown} == {f"ebpf: {expected}"}
    # The detail: the hooks, where they attach, the buffer, and why this path.
    header = stdout.getvalue().splitlines()[2]
    assert source.plan.describe() in header
