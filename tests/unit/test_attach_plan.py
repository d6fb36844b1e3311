"""probe:auto's order (docs/decisions/tcp-path-by-cost.md) over what a kernel offers. The kernel's
answers are stood in for here, as no one kernel offers every combination; tests/vm runs each
path on real stock kernels, tests/kernel on this machine's."""

from __future__ import annotations

from pathlib import Path

import pytest

from egress_auditor.errors import AuditorError
from egress_auditor.host import facts
from egress_auditor.inputs.ebpf import SHORT_PATHS, TCP_HOOKS, AttachPlan, plan_attach


def offer(monkeypatch: pytest.MonkeyPatch, *, cgroup: bool, fentry: bool, kprobes: bool, ringbuf: bool = True) -> None:
    monkeypatch.setattr(facts, "ringbuf_supported", lambda: ringbuf)
    monkeypatch.setattr(facts, "cgroup2_root", lambda: Path("/sys/fs/cgroup") if cgroup else None)
    monkeypatch.setattr(facts, "fentry_usable", lambda: (fentry, "fentry ok" if fentry else "fentry refused: EPERM"))
    monkeypatch.setattr(facts, "kprobes_usable", lambda: (kprobes, "kprobes ok" if kprobes else "no kprobes"))
    monkeypatch.setattr(facts, "tracepoint_exists", lambda _category, _event: True)


@pytest.mark.parametrize(
    ("cgroup", "fentry", "kprobes", "path"),
    [
        (True, True, True, "cgroup"),
        (False, True, True, "fentry"),
        (False, False, True, "kprobe"),
        (False, False, False, "tracepoint"),
    ],
)
def test_auto_takes_the_cheapest_path_offered(
    monkeypatch: pytest.MonkeyPatch, cgroup: bool, fentry: bool, kprobes: bool, path: str
) -> None:
    offer(monkeypatch, cgroup=cgroup, fentry=fentry, kprobes=kprobes)
    plan = plan_attach("auto", "auto")
    assert plan.tcp_hook == path
    if path in ("kprobe", "tracepoint"):
        assert "fentry refused: EPERM" in plan.reason, "says why fentry was passed over"


def test_fentry_is_not_tried_when_the_cgroup_hooks_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    offer(monkeypatch, cgroup=True, fentry=True, kprobes=True)

    def refuse() -> tuple[bool, str]:
        raise AssertionError("loading a probe program is not needed here")

    monkeypatch.setattr(facts, "fentry_usable", refuse)
    assert plan_attach("auto", "auto").tcp_hook == "cgroup"


def test_asking_for_fentry_where_refused_names_the_kernels_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    offer(monkeypatch, cgroup=True, fentry=False, kprobes=True)
    with pytest.raises(AuditorError, match="ebpf:probe:fentry: fentry refused: EPERM"):
        plan_attach("fentry", "auto")
    offer(monkeypatch, cgroup=True, fentry=True, kprobes=False)
    assert plan_attach("fentry", "auto").tcp_hook == "fentry"


@pytest.mark.parametrize("path", sorted(TCP_HOOKS))
@pytest.mark.parametrize("udp", ["cgroup", "syscalls", "off"])
def test_every_plan_has_a_short_name_and_a_description(path: str, udp: str) -> None:
    plan = AttachPlan(path, "ringbuf", "asked for", udp=udp, dns=True, cgroup_root="/sys/fs/cgroup")
    assert plan.short().startswith(SHORT_PATHS[path]) and plan.short().endswith(" + DNS")
    assert plan.describe().startswith(TCP_HOOKS[path])
