"""DNS answers for the inputs that see connections without BPF (nflog, nfqueue):
bpf/dns.bpf.c loaded alone, its cgroup_skb ingress program at the cgroup v2
root, feeding the run's `DnsNames`. Its answers carry no process (the sockets'
owners are learned by the eBPF input's hooks, not loaded here), so the names
are host-wide; the run names each connection (enrich.py)."""

from __future__ import annotations

import time
from typing import Any

from egress_auditor.attribution.names import DnsNames
from egress_auditor.errors import AuditorError
from egress_auditor.host import facts
from egress_auditor.host.compiler import compile_bpf
from egress_auditor.inputs.ebpf import build
from egress_auditor.inputs.ebpf.decode import STAT_EVENTS_LOST
from egress_auditor.inputs.ebpf.plan import INGRESS_PROGRAM

PIECES = ("dns.bpf.c", "cgroup_hooks.bpf.c")
DNS_PAGES = 256  # the ring of answers, as the eBPF input's default
# The shared pieces declare the connect events' ring and the flow map: unused here, so the least the kernel takes.
UNUSED_SIZES = ["-DEA_MAX_FLOWS=1", "-DEA_RINGBUF_PAGES=1"]


class DnsAnswers:
    def __init__(self, names: DnsNames, pages: int = DNS_PAGES) -> None:
        self.names = names
        self.pages = pages
        self.bpf: Any = None
        self.cgroup = build.CgroupAttachment()
        self._epoch_offset = time.time() - time.monotonic()  # bpf_ktime_get_ns() is CLOCK_MONOTONIC

    def open(self) -> str:
        """Load and attach; AuditorError in one line where the host cannot run the program."""
        problem = facts.environment_problem()
        if problem:
            raise AuditorError(problem)
        root = facts.cgroup2_root()
        if root is None:
            raise AuditorError("no cgroup v2 mount")
        if not facts.ringbuf_supported():
            raise AuditorError("no BPF ring buffer (5.8+)")
        src = build.bpf_source_dir()
        cflags = [f"-I{src}", "-DEA_DNS", "-DEA_USE_RINGBUF", f"-DEA_DNS_PAGES={self.pages}", *UNUSED_SIZES]
        try:
            self.bpf = compile_bpf(build.program_text(PIECES, src), cflags)
            self.cgroup.attach(self.bpf, root, (INGRESS_PROGRAM,))
            self.bpf["dns_events"].open_ring_buffer(self._on_dns)
        except Exception as exc:  # BCC raises bare Exception for compile, load and attach failures
            self.close()
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AuditorError(f"the DNS program did not load ({why})") from exc
        return f"DNS answers: cgroup_skb ingress at {root}"

    def _on_dns(self, _ctx: Any, data: Any, _size: int) -> None:
        build.learn_answer(self.names, self.bpf["dns_events"].event(data), self._epoch_offset)

    def poll(self) -> None:
        """Learn every answer written so far."""
        if self.bpf is not None:
            self.bpf.ring_buffer_consume()

    def lost(self) -> int:
        """Answers the ring could not take."""
        return int(self.bpf["stats"].sum(STAT_EVENTS_LOST).value) if self.bpf is not None else 0

    def close(self) -> None:
        self.cgroup.close()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
