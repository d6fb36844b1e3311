"""The eBPF input: bpf/tcp_connect.bpf.c through BCC.

Repeats of a flow are counted in the kernel's flow map; only a flow's first
connect arrives as an event. sync() folds the map's counts into the flow
table and recovers any flow whose first event was lost.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egress_auditor import host
from egress_auditor.errors import AuditorError
from egress_auditor.inputs import Emit, InputStats, OnCount
from egress_auditor.model import Connection, Family, FlowKey, Process, Protocol
from egress_auditor.plugins import Option, Plugin, positive_int

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
EVENT_NEW_FLOW, EVENT_MAP_FULL = 1, 2
STAT_CONNECTS, STAT_EVENTS_LOST, STAT_MAP_FULL = 0, 1, 2


def bpf_source_dir() -> Path:
    """bpf/ beside the package (checkout, editable install) or shipped inside it."""
    for candidate in (BPF_DIR, Path(__file__).resolve().parent.parent.parent / "bpf"):
        if (candidate / "flow_map.bpf.c").exists():
            return candidate
    raise AuditorError(f"BPF sources not found (looked in {BPF_DIR})")


def program_text(pieces: tuple[str, ...], src: Path | None = None) -> bytes:
    """One compile unit: the shared flow map first, then each program in use.

    BCC rewrites map calls and builds tracepoint argument structs only in its
    main text, so the pieces are joined, not #included.
    """
    src = src or bpf_source_dir()
    parts = [f'#line 1 "{name}"\n' + (src / name).read_text() for name in ("flow_map.bpf.c", *pieces)]
    return "\n".join(parts).encode()


@dataclass(frozen=True)
class AttachPlan:
    path: str  # "kprobe" or "tracepoint"
    buffer: str  # "ringbuf" or "perf"
    reason: str

    def describe(self) -> str:
        hook = (
            "kprobes tcp_v4_connect/tcp_v6_connect" if self.path == "kprobe" else "tracepoint sock:inet_sock_set_state"
        )
        return f"{hook}, {'ring buffer' if self.buffer == 'ringbuf' else 'perf buffer'} ({self.reason})"


def plan_attach(probe: str, buffer: str) -> AttachPlan:
    """Decide the attach path and buffer from what the kernel offers."""
    kprobes_ok, kprobes_why = host.kprobes_usable()
    tracepoint_ok = host.tracepoint_exists("sock", "inet_sock_set_state")
    if probe == "kprobe":
        if not kprobes_ok:
            raise AuditorError(f"-I ebpf:probe:kprobe: {kprobes_why}; use ebpf:probe:tracepoint or auto")
        path, reason = "kprobe", "asked for kprobes"
    elif probe == "tracepoint":
        if not tracepoint_ok:
            raise AuditorError(
                "-I ebpf:probe:tracepoint: sock:inet_sock_set_state not found (kernel 4.16+ and tracefs needed)"
            )
        path, reason = "tracepoint", "asked for the tracepoint"
    elif kprobes_ok:
        path, reason = "kprobe", "auto: the kernel has kprobes"
    elif tracepoint_ok:
        path, reason = "tracepoint", f"auto: {kprobes_why}"
    else:
        raise AuditorError(
            f"no TCP connect hook: {kprobes_why}, and tracepoint sock:inet_sock_set_state "
            "is missing (mount -t tracefs tracefs /sys/kernel/tracing)"
        )
    ring_ok = host.ringbuf_supported()
    if buffer == "ringbuf" and not ring_ok:
        raise AuditorError("-I ebpf:buffer:ringbuf: this kernel has no BPF ring buffer (5.8+); use perf or auto")
    chosen = "ringbuf" if buffer == "ringbuf" or (buffer == "auto" and ring_ok) else "perf"
    if buffer == "auto" and not ring_ok:
        reason += "; no ring buffer before 5.8"
    return AttachPlan(path, chosen, reason)


def to_address(family: int, raw: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    data = bytes(raw)
    return ipaddress.IPv4Address(data[:4]) if family == Family.IPV4 else ipaddress.IPv6Address(data[:16])


def decode_comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


class EbpfInput:
    name = "ebpf"

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.bpf: Any = None
        self.plan: AttachPlan | None = None
        self._announced: set[bytes] = set()  # flow keys already handed to user space
        self._map_full_events = 0
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: this maps it to wall time.
        self._epoch_offset = time.time() - time.monotonic()

    def open(self) -> str:
        problem = host.environment_problem()
        if problem:
            raise AuditorError(problem)
        mounted = ""
        if host.tracefs() is None and self.options["probe"] != "kprobe":
            if host.mount_tracefs() is None:
                raise AuditorError(
                    "tracefs is not mounted and could not be: mount -t tracefs tracefs /sys/kernel/tracing"
                )
            mounted = "; mounted tracefs at /sys/kernel/tracing"
        self.plan = plan_attach(self.options["probe"], self.options["buffer"])
        from bcc import BPF  # imported late: `list` and `doctor` work without BCC

        src = bpf_source_dir()
        cflags = [
            f"-I{src}",
            f"-DEA_PATH_{self.plan.path.upper()}",
            f"-DEA_MAX_FLOWS={self.options['max_flows']}",
            f"-DEA_RINGBUF_PAGES={self.options['pages']}",
        ]
        if self.plan.buffer == "ringbuf":
            cflags.append("-DEA_USE_RINGBUF")
        try:
            self.bpf = BPF(text=program_text(("tcp_connect.bpf.c",), src), cflags=cflags)
            if self.plan.path == "kprobe":
                self.bpf.attach_kprobe(event=b"tcp_v4_connect", fn_name=b"trace_v4")
                self.bpf.attach_kprobe(event=b"tcp_v6_connect", fn_name=b"trace_v6")
            events = self.bpf["events"]
            if self.plan.buffer == "ringbuf":
                events.open_ring_buffer(self._on_event)
            else:
                events.open_perf_buffer(self._on_event, page_cnt=self.options["pages"], lost_cb=self._on_perf_lost)
        except Exception as exc:  # BCC raises bare Exception for compile and attach failures
            raise AuditorError(f"could not load the BPF program ({self.plan.describe()}): {exc}") from exc
        self._perf_lost = 0
        self._pending: list[Connection] = []
        return self.plan.describe() + mounted

    def _on_perf_lost(self, lost: int) -> None:
        # Not added to stats(): the failed perf_submit already counted each of these in the kernel.
        self._perf_lost += lost

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> None:
        event = self.bpf["events"].event(data)
        if event.flags == EVENT_MAP_FULL:
            self._map_full_events += 1
        else:
            self._announced.add(self._key_bytes(event))
        self._pending.append(self._connection(event))

    @staticmethod
    def _key_bytes(event: Any) -> bytes:
        daddr = bytes(event.daddr)
        return b"%d/%d/%d/%d/" % (event.protocol, event.family, event.dport, event.uid) + daddr + bytes(event.comm)

    def _connection(self, event: Any) -> Connection:
        family = Family(event.family)
        comm = decode_comm(bytes(event.comm))
        src = to_address(family, event.saddr)
        return Connection(
            time=event.ts_ns / 1e9 + self._epoch_offset,
            protocol=Protocol(event.protocol),
            family=family,
            src=None if src.is_unspecified else src,
            sport=event.sport,
            dst=to_address(family, event.daddr),
            dport=event.dport,
            pid=event.pid,
            uid=event.uid,
            gid=event.gid,
            comm=comm,
            input=self.name,
            process=Process(pid=event.pid, name=comm, uid=event.uid),
        )

    def poll(self, timeout_s: float, emit: Emit) -> None:
        if self.plan is None:
            return
        ms = max(0, int(timeout_s * 1000))
        if self.plan.buffer == "ringbuf":
            self.bpf.ring_buffer_poll(ms)
        else:
            self.bpf.perf_buffer_poll(ms)
        pending, self._pending = self._pending, []
        for conn in pending:
            emit(conn)

    def sync(self, emit: Emit, on_count: OnCount) -> None:
        """Fold kernel counts; a flow whose first event was lost is emitted from the map."""
        if self.bpf is None:
            return
        for key, value in self._flow_items():
            kbytes = self._key_bytes(key)
            family = Family(key.family)
            comm = decode_comm(bytes(key.comm))
            dst = to_address(family, key.daddr)
            first = value.first_ns / 1e9 + self._epoch_offset
            last = value.last_ns / 1e9 + self._epoch_offset
            if kbytes not in self._announced:
                self._announced.add(kbytes)
                emit(
                    Connection(
                        time=first,
                        protocol=Protocol(key.protocol),
                        family=family,
                        src=None,
                        sport=0,
                        dst=dst,
                        dport=key.dport,
                        pid=0,
                        uid=key.uid,
                        gid=-1,
                        comm=comm,
                        input=self.name,
                        process=Process(pid=0, name=comm, uid=key.uid),
                    )
                )
            on_count(FlowKey(Protocol(key.protocol), family, dst, key.dport, key.uid, comm), value.count, last)

    def _flow_items(self) -> list[tuple[Any, Any]]:
        table = self.bpf["flows"]
        try:
            return list(table.items_lookup_batch())
        except Exception:  # kernels before 5.6 have no batch lookup
            return list(table.items())

    def stats(self) -> InputStats:
        if self.bpf is None:
            return InputStats()
        table = self.bpf["stats"]
        counters = [int(table.sum(slot).value) for slot in (STAT_CONNECTS, STAT_EVENTS_LOST, STAT_MAP_FULL)]
        return InputStats(connects=counters[0], events_lost=counters[1], map_full=counters[2])

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


PLUGIN = Plugin(
    name="ebpf",
    kind="input",
    description="New TCP connections from the kernel via eBPF (BCC): kprobes on tcp_v4/v6_connect "
    "or the sock:inet_sock_set_state tracepoint; repeats counted in the kernel.",
    factory=EbpfInput,
    options=(
        Option(
            "probe",
            "attach path: auto picks kprobes when the kernel has them, else the tracepoint",
            "auto",
            ("auto", "kprobe", "tracepoint"),
        ),
        Option(
            "buffer",
            "event buffer: auto picks the ring buffer when the kernel has it (5.8+)",
            "auto",
            ("auto", "ringbuf", "perf"),
        ),
        Option(
            "max_flows",
            "flows the kernel map holds; beyond that each connect is sent to user space and counted",
            "65536",
            convert=positive_int,
            valid="a positive whole number",
        ),
        Option(
            "pages",
            "pages of the event buffer (a power of two)",
            "64",
            convert=lambda v: _power_of_two(v),
            valid="a power of two, e.g. 64",
        ),
    ),
    example="-i ebpf -I ebpf:probe:tracepoint",
)


def _power_of_two(value: str) -> int:
    number = positive_int(value)
    if number & (number - 1):
        raise ValueError("a power of two")
    return number


__all__ = ["PLUGIN", "EbpfInput", "plan_attach"]
