"""The eBPF input, one concern a module: `plan` (where to attach, from what the host
offers), `build` (the BPF object and its flags), `decode` (kernel records into
Connection and FlowKey values), `generations` (the flow map's two generations and
their bookkeeping: flips, lost events, counts to fold), `maps` (reading the flow
map), `count_lines` (the kernel's count lines), `input` (the input itself: open,
poll, sync, close, and its PLUGIN); `dns_answers` (the DNS program alone, for the
netfilter inputs)."""

from egress_auditor.inputs.ebpf.build import (
    bpf_source_dir,
    count_line_flags,
    count_lines_for,
    identity_flags,
    program_text,
)
from egress_auditor.inputs.ebpf.decode import EVENT_MAP_FULL, EVENT_NEW_FLOW, STAT_EVENTS_LOST, STAT_MAP_FULL
from egress_auditor.inputs.ebpf.input import PLUGIN, EbpfInput
from egress_auditor.inputs.ebpf.plan import SHORT_PATHS, TCP_HOOKS, AttachPlan, plan_attach

__all__ = [
    "EVENT_MAP_FULL",
    "EVENT_NEW_FLOW",
    "PLUGIN",
    "SHORT_PATHS",
    "STAT_EVENTS_LOST",
    "STAT_MAP_FULL",
    "TCP_HOOKS",
    "AttachPlan",
    "EbpfInput",
    "bpf_source_dir",
    "count_line_flags",
    "count_lines_for",
    "identity_flags",
    "plan_attach",
    "program_text",
]
