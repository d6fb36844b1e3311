"""The eBPF input: bpf/*.bpf.c through BCC, as one compiled object.

TCP connects (kprobes, cgroup connect hooks or tracepoint), UDP destinations (cgroup sock_addr
hooks or syscall tracepoints) and DNS answers (cgroup_skb ingress). Repeats of
a flow are counted in the kernel: in the flow map, and once sync() has given
the flow a slot, in its count line (count_lines.py); only a flow's first
connect arrives as an event. sync() folds those counts into the flow table
and recovers any flow whose first event was lost.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import ipaddress
import itertools
import os
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egress_auditor import host
from egress_auditor.compiler import warning_flags
from egress_auditor.dns import DnsNames
from egress_auditor.errors import AuditorError
from egress_auditor.inputs import Emit, InputStats, OnCount
from egress_auditor.inputs.count_lines import LINE_MUL, CountLines, line_bits
from egress_auditor.inputs.task_fields import task_fields
from egress_auditor.model import Connection, Family, FlowKey, Process, Transport
from egress_auditor.plugins import Option, Plugin, positive_int

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
EVENT_NEW_FLOW, EVENT_MAP_FULL = 1, 2
STAT_EVENTS_LOST, STAT_MAP_FULL = 0, 1  # bpf/events.h: EA_STAT_*


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


# What the live header calls each path: the detail is in the attach line, doctor and the rules' header.
SHORT_PATHS = {
    "fentry": "fentry",
    "kprobe": "kprobes",
    "cgroup": "cgroup hooks",
    "tracepoint": "tracepoint",
    "syscalls": "syscall tracepoints",
}
TCP_HOOKS = {
    "fentry": "fentry tcp_v4_connect/tcp_v6_connect",
    "kprobe": "kprobes tcp_v4_connect/tcp_v6_connect",
    "cgroup": "TCP: cgroup connect4/6 hooks",
    "tracepoint": "tracepoint sock:inet_sock_set_state",
}


@dataclass(frozen=True)
class AttachPlan:
    path: str  # where TCP connects are seen: a key of TCP_HOOKS
    buffer: str  # "ringbuf" or "perf"
    reason: str
    udp: str = "off"  # "cgroup", "syscalls" or "off"
    dns: bool = False
    cgroup_root: str | None = None  # where the cgroup programs attach
    udp_send_tp: bool = False  # cgroup UDP: first sends of connected sockets at sock:sock_send_length

    def describe(self) -> str:
        parts = [TCP_HOOKS[self.path] + (f" at {self.cgroup_root}" if self.path == "cgroup" else "")]
        if self.udp == "cgroup":
            first_send = "raw tracepoint sock_send_length" if self.udp_send_tp else "egress hooks"
            parts.append(f"UDP: cgroup connect/sendmsg/recvmsg/{first_send} at {self.cgroup_root}")
        elif self.udp == "syscalls":
            parts.append("UDP: syscall tracepoints connect/sendto/sendmsg")
        if self.dns:
            parts.append("DNS answers: cgroup_skb ingress")
        parts.append("ring buffer" if self.buffer == "ringbuf" else "perf buffer")
        return f"{', '.join(parts)} ({self.reason})"

    def short(self) -> str:
        """`cgroup hooks + DNS`: each path by its short name, once."""
        paths = [SHORT_PATHS[self.path], *((SHORT_PATHS[self.udp],) if self.udp != "off" else ())]
        return " + ".join([*dict.fromkeys(paths), *(("DNS",) if self.dns else ())])

    def pieces(self) -> tuple[str, ...]:
        return (
            "tcp_connect.bpf.c",
            *(("udp_send.bpf.c",) if self.udp != "off" else ()),
            *(("dns.bpf.c",) if self.dns else ()),
            *(("cgroup_hooks.bpf.c",) if self.cgroup_programs() else ()),
        )

    def cgroup_programs(self) -> tuple[tuple[str, str, str], ...]:
        """(function, program type, attach type) of each program to attach at the cgroup root."""
        programs: list[tuple[str, str, str]] = []
        if self.path == "cgroup" or self.udp == "cgroup":
            programs += CONNECT_PROGRAMS
        if self.udp == "cgroup":
            programs += UDP_PROGRAMS
            if not self.udp_send_tp:
                programs.append(UDP_EGRESS_PROGRAM)
        if self.dns:
            programs.append(INGRESS_PROGRAM)
        return tuple(programs)

    def cflags(self) -> list[str]:
        flags = [f"-DEA_PATH_{self.path.upper()}"]
        if self.buffer == "ringbuf":
            flags.append("-DEA_USE_RINGBUF")
        if self.udp != "off":
            flags.append(f"-DEA_UDP_{self.udp.upper()}")
        if self.dns:
            flags.append("-DEA_DNS")
        if self.udp == "cgroup" and self.udp_send_tp:
            flags.append("-DEA_UDP_SEND_TP")
        return flags


def _plan_udp(udp: str, ring_ok: bool, cgroup_root: str | None) -> tuple[str, str]:
    """The UDP path and why: cgroup hooks need cgroup v2 and the ring buffer."""
    syscalls_ok = all(host.tracepoint_exists("syscalls", f"sys_{e}_{c}") for e, c in host.SYSCALL_TRACEPOINTS)
    cgroup_ok = cgroup_root is not None and ring_ok
    why_not_cgroup = "no cgroup v2 mount" if cgroup_root is None else "no ring buffer"
    if udp == "off":
        return "off", "UDP off"
    if udp == "cgroup":
        if not cgroup_ok:
            raise AuditorError(f"-I ebpf:udp:cgroup: {why_not_cgroup}; use ebpf:udp:syscalls or auto")
        return "cgroup", "UDP via cgroup hooks as asked"
    if udp == "syscalls":
        if not syscalls_ok:
            raise AuditorError("-I ebpf:udp:syscalls: syscall tracepoints missing (CONFIG_FTRACE_SYSCALLS)")
        return "syscalls", "UDP via syscall tracepoints as asked"
    if cgroup_ok:
        return "cgroup", "UDP via cgroup hooks"
    if syscalls_ok:
        return "syscalls", f"UDP via syscall tracepoints: {why_not_cgroup}"
    return "off", f"UDP not traced: {why_not_cgroup} and no syscall tracepoints"


def plan_attach(probe: str, buffer: str, udp: str = "auto", dns: str = "off") -> AttachPlan:
    """Decide the attach paths and buffer from what the kernel offers."""
    ring_ok = host.ringbuf_supported()
    if buffer == "ringbuf" and not ring_ok:
        raise AuditorError("-I ebpf:buffer:ringbuf: this kernel has no BPF ring buffer (5.8+); use perf or auto")
    chosen = "ringbuf" if buffer == "ringbuf" or (buffer == "auto" and ring_ok) else "perf"
    cgroup_root = host.cgroup2_root()
    # The cgroup programs use helpers that came with the ring buffer (5.8).
    cgroup_ok = cgroup_root is not None and chosen == "ringbuf"
    why_not_cgroup = "no cgroup v2 mount" if cgroup_root is None else "no ring buffer"
    kprobes_ok, kprobes_why = host.kprobes_usable()
    tracepoint_ok = host.tracepoint_exists("sock", "inet_sock_set_state")
    # Tried only when it may be chosen: it loads (and attaches) a program.
    asked_or_next = probe == "fentry" or (probe == "auto" and not cgroup_ok)
    fentry_ok, fentry_why = host.fentry_usable() if asked_or_next else (False, "")
    if probe == "fentry":
        if not fentry_ok:
            raise AuditorError(f"-I ebpf:probe:fentry: {fentry_why}; use ebpf:probe:kprobe, cgroup, tracepoint or auto")
        path, reason = "fentry", "asked for fentry"
    elif probe == "kprobe":
        if not kprobes_ok:
            raise AuditorError(f"-I ebpf:probe:kprobe: {kprobes_why}; use ebpf:probe:cgroup, tracepoint or auto")
        path, reason = "kprobe", "asked for kprobes"
    elif probe == "cgroup":
        if not cgroup_ok:
            raise AuditorError(f"-I ebpf:probe:cgroup: {why_not_cgroup}; use ebpf:probe:tracepoint or auto")
        path, reason = "cgroup", "asked for the cgroup connect hooks"
    elif probe == "tracepoint":
        if not tracepoint_ok:
            raise AuditorError(
                "-I ebpf:probe:tracepoint: sock:inet_sock_set_state not found (kernel 4.16+ and tracefs needed)"
            )
        path, reason = "tracepoint", "asked for the tracepoint"
    # auto: the cheapest path per connect that loads here, by the programs' run times measured side
    # by side on Debian's stock kernels (docs/benchmarks.md): the cgroup hook (its program reads the
    # address from its context, and UDP's hooks share it), fentry, kprobes, the tracepoint.
    elif cgroup_ok:
        path, reason = "cgroup", "auto: the cheapest per connect"
    elif fentry_ok:
        path, reason = "fentry", f"auto: for the cgroup hooks {why_not_cgroup}"
    elif kprobes_ok:
        path, reason = "kprobe", f"auto: for the cgroup hooks {why_not_cgroup}; {fentry_why}"
    elif tracepoint_ok:
        path, reason = "tracepoint", f"auto: for the cgroup hooks {why_not_cgroup}, {fentry_why}, {kprobes_why}"
    else:
        raise AuditorError(
            f"no TCP connect hook: for the cgroup hooks {why_not_cgroup}, {fentry_why}, {kprobes_why}, and "
            "tracepoint sock:inet_sock_set_state is missing (mount -t tracefs tracefs /sys/kernel/tracing)"
        )
    if buffer == "auto" and not ring_ok:
        reason += "; no ring buffer before 5.8"
    udp_path, udp_why = _plan_udp(udp, chosen == "ringbuf", cgroup_root)
    dns_ok = cgroup_root is not None and chosen == "ringbuf"
    if dns == "on" and not dns_ok:
        raise AuditorError("-I ebpf:dns:on: DNS answers need cgroup v2 and the BPF ring buffer; use auto or off")
    # auto: on where the kernel allows it, for callers that want names without failing
    use_dns = dns == "on" or (dns == "auto" and dns_ok)
    if udp_path != "cgroup" or dns != "auto" or not use_dns:
        reason += f"; {udp_why}" + (
            "" if use_dns or dns == "off" else "; no DNS names: needs cgroup v2 and ring buffer"
        )
    # Raw tracepoints need no tracefs, but its format file tells whether the kernel has this one.
    send_tp = udp_path == "cgroup" and host.tracepoint_exists("sock", "sock_send_length")
    return AttachPlan(
        path, chosen, reason, udp_path, use_dns, str(cgroup_root) if cgroup_root else None, udp_send_tp=send_tp
    )


def to_address(family: int, raw: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    data = bytes(raw)
    return ipaddress.IPv4Address(data[:4]) if family == Family.IPV4 else ipaddress.IPv6Address(data[:16])


def copy_field(dst: Any, src: Any, name: str) -> None:
    """Copy field `name` between two BCC-built ctypes structs, byte for byte (char arrays included)."""
    to, frm = getattr(type(dst), name), getattr(type(src), name)
    ctypes.memmove(ctypes.addressof(dst) + to.offset, ctypes.addressof(src) + frm.offset, min(to.size, frm.size))


def decode_comm(raw: bytes) -> str:
    # Interned: every flow of a process keeps its name, and one string serves them all.
    return sys.intern(raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace"))


RECOVERY_MARGIN_NS = 10_000_000  # far longer than a lost event takes to be counted after its flow
# Flows (and count lines) a kernel map may be asked for: a flow map entry takes about 200 bytes of kernel memory.
MAX_FLOWS_LIMIT = 1 << 24
SYNC_BATCH = 4096  # kernel flows read per bpf(2) call: small buffers, kept between syncs
POLL_BATCH = 1024  # events made into Connections per poll: a burst waits in the kernel's buffer, not in Python
_U64 = struct.Struct("=Q")


# bpf(2) commands and attach types used for cgroup programs (uapi/linux/bpf.h).
_BPF_LINK_CREATE = 28
_BPF_F_ALLOW_MULTI = 2
CONNECT_PROGRAMS = (
    ("connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
    ("connect6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT"),
)
UDP_PROGRAMS = (
    ("udp_sendmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_SENDMSG"),
    ("udp_sendmsg6", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_SENDMSG"),
    ("udp_recvmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_RECVMSG"),
    ("udp_recvmsg6", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_RECVMSG"),
)
# How a connected UDP socket's first send is seen: a raw tracepoint on sock_send_length
# (6.3+, attached by BCC at load), else a cgroup_skb egress program on every packet.
UDP_EGRESS_PROGRAM = ("udp_egress", "CGROUP_SKB", "CGROUP_INET_EGRESS")
INGRESS_PROGRAM = ("ingress", "CGROUP_SKB", "CGROUP_INET_INGRESS")  # DNS answers


class EbpfInput:
    name = "ebpf"

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.bpf: Any = None
        self.plan: AttachPlan | None = None
        self.names = DnsNames()
        # Flow map keys (raw bytes) whose event arrived since the last sync, and in the
        # interval before: only flows that new can still lack their event, so older
        # keys are dropped instead of held for the whole run.
        self._announced: set[bytes] = set()
        self._announced_before: set[bytes] = set()
        self._synced_ns = 0  # CLOCK_MONOTONIC when the last sync began: older kernel flows are folded already
        self._lost_seen = 0  # events lost as of the last sync
        self._ports: dict[int, int] = {}  # one int object per port number, shared by its flows
        self._batch: tuple[Any, Any] | None = None  # (keys, values) buffers of SYNC_BATCH entries
        self._pending: list[Connection] = []
        self._batch_full = False  # the last poll stopped at POLL_BATCH: more may wait in the ring buffer
        self._last_event_ns = 0
        self._links: list[int] = []  # bpf_link fds: closing them detaches, even on SIGKILL
        self._legacy_attached: list[tuple[Any, int, int]] = []  # (fn, cgroup fd, type) without links
        self._cgroup_fd: int | None = None
        self._command_cgroup: tuple[int, int] | None = None  # (id, depth): see restrict_to_cgroup
        self._lines: CountLines | None = None
        self.fingerprint_key: tuple[int, ...] = ()  # the 12 NH keys of the count lines' fingerprints
        self.identity_from_task = False  # names and uids read from the task through BTF, not by helpers
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: this maps it to wall time.
        self._epoch_offset = time.time() - time.monotonic()

    def open(self) -> str:
        problem = host.environment_problem()
        if problem:
            raise AuditorError(problem)
        mounted = ""
        if host.tracefs() is None and self.options["probe"] not in ("kprobe", "fentry"):
            if host.mount_tracefs() is None:
                raise AuditorError(
                    "tracefs is not mounted and could not be: mount -t tracefs tracefs /sys/kernel/tracing"
                )
            mounted = "; mounted tracefs at /sys/kernel/tracing"
        self.plan = plan_attach(self.options["probe"], self.options["buffer"], self.options["udp"], self.options["dns"])
        src = bpf_source_dir()
        cflags = [
            f"-I{src}",
            f"-DEA_MAX_FLOWS={self.options['max_flows']}",
            f"-DEA_RINGBUF_PAGES={self.options['pages']}",
        ]
        if self._command_cgroup is not None:
            cflags += ["-DEA_CGROUP_FILTER", f"-DEA_CGROUP_ID={self._command_cgroup[0]}ULL"]
            cflags.append(f"-DEA_CGROUP_LEVEL={self._command_cgroup[1]}")
        lines = count_lines(self.options["count_lines"], self.options["max_flows"], self.plan.buffer)
        if lines:
            self.fingerprint_key, line_flags = count_line_flags(lines)
            cflags += line_flags
        identity = identity_flags()
        try:
            self.bpf = self._build_plan(src, cflags, identity)
            if lines:
                self._lines = CountLines(self.bpf["count_lines"].map_fd, lines)
            if self.plan.path == "kprobe":
                self.bpf.attach_kprobe(event=b"tcp_v4_connect", fn_name=b"trace_v4")
                self.bpf.attach_kprobe(event=b"tcp_v6_connect", fn_name=b"trace_v6")
            programs = self.plan.cgroup_programs()
            if programs:
                self._attach_cgroup(programs)
            events = self.bpf["events"]
            if self.plan.buffer == "ringbuf":
                events.open_ring_buffer(self._on_event)
            else:
                # The kernel counter already has these losses; without a callback BCC prints them on stderr.
                events.open_perf_buffer(self._on_event, page_cnt=self.options["pages"], lost_cb=lambda _lost: None)
            if self.plan.dns:
                self.bpf["dns_events"].open_ring_buffer(self._on_dns)
        except Exception as exc:  # BCC raises bare Exception for compile and attach failures
            self.close()
            raise AuditorError(f"could not load the BPF programs ({self.plan.describe()}): {exc}") from exc
        how = "read from the task (BTF)" if self.identity_from_task else "read by helpers"
        return f"{self.plan.describe()}; names and uids {how}{mounted}"

    def _build_plan(self, src: Path, cflags: list[str], identity: list[str]) -> Any:
        """The plan's BPF object; with dns:auto, one without names where the kernel refuses the DNS program."""
        assert self.plan is not None
        try:
            return self._build(program_text(self.plan.pieces(), src), [*self.plan.cflags(), *cflags], identity)
        except Exception as exc:  # BCC raises bare Exception for compile and load failures
            if not self.plan.dns or self.options["dns"] != "auto":
                raise
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            note = f"; no DNS names: their program did not load ({why})"
            self.plan = dataclasses.replace(self.plan, dns=False, reason=self.plan.reason + note)
        return self._build(program_text(self.plan.pieces(), src), [*self.plan.cflags(), *cflags], identity)

    def _build(self, text: str, cflags: list[str], identity: list[str]) -> Any:
        """The BPF object, names and uids read from the task where the kernel lets these programs do
        so: one whose cgroup programs lack bpf_get_current_task_btf refuses them at load, and gets the
        helpers instead."""
        self.identity_from_task = bool(identity)
        if identity:
            try:
                return self._load(text, [*cflags, *identity])
            except Exception:  # BCC raises bare Exception when the verifier refuses a program
                self.identity_from_task = False
        return self._load(text, cflags)

    def _load(self, text: str, cflags: list[str]) -> Any:
        """Compile, and load the cgroup programs (BCC keeps them for _attach_cgroup): the verifier
        answers here, before anything is attached."""
        from bcc import BPF, BPFAttachType  # imported late: `list` and `doctor` work without BCC

        assert self.plan is not None
        built = BPF(text=text, cflags=[*cflags, *warning_flags()])
        try:
            for function, prog_type, attach_name in self.plan.cgroup_programs():
                attach_type = getattr(BPFAttachType, attach_name)
                built.load_func(function.encode(), getattr(BPF, prog_type), attach_type=attach_type)
        except Exception:
            built.cleanup()
            raise
        return built

    @property
    def path(self) -> str:
        """The attach paths in use, by their short names (after open())."""
        return self.plan.short() if self.plan is not None else ""

    @property
    def lines(self) -> CountLines | None:
        """The count lines in use, if any (none on kernels without the ring buffer, or when turned off)."""
        return self._lines

    def restrict_to_cgroup(self, cgroup_id: int, depth: int) -> None:
        """Before open(): count only connects from this cgroup v2 and below it (trace -- CMD)."""
        self._command_cgroup = (cgroup_id, depth)

    def _attach_cgroup(self, programs: tuple[tuple[str, str, str], ...]) -> None:
        """Attach at the cgroup v2 root through BPF links (5.7+), beside any
        programs already there; without links, with BPF_F_ALLOW_MULTI."""
        from bcc import BPF, BPFAttachType

        assert self.plan is not None and self.plan.cgroup_root is not None
        self._cgroup_fd = os.open(self.plan.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        for function, prog_type, attach_name in programs:
            attach_type = getattr(BPFAttachType, attach_name)
            fn = self.bpf.load_func(function.encode(), getattr(BPF, prog_type), attach_type=attach_type)
            try:
                self._links.append(host.bpf_syscall(_BPF_LINK_CREATE, [fn.fd, self._cgroup_fd, attach_type, 0]))
            except OSError:
                BPF.attach_func(fn, self._cgroup_fd, attach_type, _BPF_F_ALLOW_MULTI)
                self._legacy_attached.append((fn, self._cgroup_fd, attach_type))

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> int:
        event = self.bpf["events"].event(data)
        if event.flags != EVENT_MAP_FULL:
            self._announced.add(self._raw_key(event))
        self._pending.append(self._connection(event))
        self._last_event_ns = event.ts_ns
        # Below zero, libbpf stops reading the ring buffer (this event is kept); perf buffers ignore it.
        self._batch_full = len(self._pending) >= POLL_BATCH
        return -1 if self._batch_full else 0

    def _on_dns(self, _ctx: Any, data: Any, _size: int) -> None:
        event = self.bpf["dns_events"].event(data)
        wire = bytes(event.data)[: event.len]
        self.names.learn(wire, event.pid, event.ts_ns / 1e9 + self._epoch_offset)

    def _raw_key(self, event: Any) -> bytes:
        """The flow map's key for an event, as the kernel built it (same fields, zeroed padding)."""
        key = self.bpf["flows"].Key()
        for name in ("daddr", "uid", "dport", "family", "protocol", "comm"):
            copy_field(key, event, name)
        return bytes(key)

    def _port(self, port: int) -> int:
        return self._ports.setdefault(port, port)

    def _connection(self, event: Any) -> Connection:
        family = Family(event.family)
        comm = decode_comm(bytes(event.comm))
        src = to_address(family, event.saddr)
        return Connection(
            time=event.ts_ns / 1e9 + self._epoch_offset,
            protocol=Transport(event.protocol),
            family=family,
            src=None if src.is_unspecified else src,
            sport=event.sport,
            dst=to_address(family, event.daddr),
            dport=self._port(event.dport),
            pid=event.pid,
            uid=event.uid,
            gid=event.gid,
            comm=comm,
            input=self.name,
            process=Process(pid=event.pid, name=comm, uid=event.uid),
            tid=event.tid,
            cgroup_id=event.cgroup_id,
        )

    def _named(self, conn: Connection) -> Connection:
        # Named after the poll: a DNS answer and the connect it led to may
        # arrive in either order within one poll of the two ring buffers.
        name = self.names.name_for(conn.dst, conn.pid, conn.time)
        return dataclasses.replace(conn, hostname=name) if name else conn

    def poll(self, timeout_s: float, emit: Emit) -> None:
        if self.plan is None or self.bpf is None:
            return
        ms = max(0, int(timeout_s * 1000))
        if self.plan.buffer == "ringbuf":
            if ms:
                self.bpf.ring_buffer_poll(ms)
            # Read every ring, ready or not: the kernel wakes a reader of each ring on its own and
            # later (irq_work), so epoll may report a connect before the DNS answer that led to it.
            # The answer was written first; the DNS ring is read after the connects, so it is here.
            if not ms or self.plan.dns:
                self.bpf.ring_buffer_consume()
        else:
            self.bpf.perf_buffer_poll(ms)
        pending, self._pending = self._pending, []
        for conn in pending:
            emit(self._named(conn))

    def _drain(self, cutoff_ns: int, emit: Emit) -> None:
        """Emit every event written before cutoff_ns, a batch at a time."""
        while True:
            self._batch_full = False
            self.poll(0, emit)
            if not self._batch_full or self._last_event_ns >= cutoff_ns:
                return

    def sync(self, emit: Emit, on_count: OnCount) -> None:
        """Fold kernel counts; a flow whose first event was lost is emitted from the map.
        Only flows used since the last sync are decoded.

        A flow lacks its event only if events were lost since the last sync and the
        flow is new since then. Events already in the buffers are drained first, up
        to a cutoff, so one still queued is never taken for lost; flows first seen
        after the cutoff wait for the next sync, whose window starts RECOVERY_MARGIN_NS
        before it in case their loss was counted just after the counter was read."""
        if self.bpf is None:
            return
        since = self._synced_ns
        lost = int(self.bpf["stats"].sum(STAT_EVENTS_LOST).value)
        recover, self._lost_seen = lost != self._lost_seen, lost
        cutoff = self._synced_ns = time.monotonic_ns()
        self._drain(cutoff, emit)
        announced = (self._announced, self._announced_before)
        self._announced_before, self._announced = self._announced, set()
        window = since - RECOVERY_MARGIN_NS
        lines = self._lines
        for raw, count, first_ns, last_ns, fp, fp2 in self._flow_entries():
            if last_ns < window:  # folded already, unless counted just before the last cutoff
                continue
            flow = self._flow_key(raw)
            if recover and window <= first_ns < cutoff and not any(raw in keys for keys in announced):
                emit(
                    self._named(
                        Connection(
                            time=first_ns / 1e9 + self._epoch_offset,
                            protocol=flow.protocol,
                            family=flow.family,
                            src=None,
                            sport=0,
                            dst=flow.dst,
                            dport=flow.dport,
                            pid=0,
                            uid=flow.uid,
                            gid=-1,
                            comm=flow.comm,
                            input=self.name,
                            process=Process(pid=0, name=flow.comm, uid=flow.uid),
                        )
                    )
                )
            # A flow that repeats gets a slot in its count line: its later repeats are counted there.
            if lines is not None and fp and (slot := lines.claim(fp, fp2, raw)) is not None:
                lines.map_count[slot] = count
                count += lines.count(slot)
                last_ns = max(last_ns, lines.last_ns(slot))
                lines.reported[slot] = count
            on_count(flow, count, last_ns / 1e9 + self._epoch_offset)
        if lines is not None:
            self._fold_lines(lines, on_count)

    def _fold_lines(self, lines: CountLines, on_count: OnCount) -> None:
        """Counts of flows counted in their count lines since the last sync (their flow map entries rest)."""
        for slot in lines.claimed:
            total = lines.map_count[slot] + lines.count(slot)
            if total != lines.reported[slot]:
                lines.reported[slot] = total
                owner = lines.owner[slot]
                assert owner is not None
                on_count(self._flow_key(owner), total, lines.last_ns(slot) / 1e9 + self._epoch_offset)

    def _flow_key(self, raw: bytes) -> FlowKey:
        """The flow of a flow map key, as the kernel built it."""
        key = self.bpf["flows"].Key.from_buffer_copy(raw)
        family = Family(key.family)
        dst = to_address(family, key.daddr)
        comm = decode_comm(bytes(key.comm))
        return FlowKey(Transport(key.protocol), family, dst, self._port(key.dport), key.uid, comm)

    def _flow_entries(self) -> Iterator[tuple[bytes, int, int, int, int, int]]:
        """(raw key, count, first_ns, last_ns, fingerprint words) of every kernel flow, read in
        batches without a ctypes object per entry (BCC's items() makes two per flow per sync)."""
        table = self.bpf["flows"]
        leaf = table.Leaf
        offsets = (leaf.count.offset, leaf.first_ns.offset, leaf.last_ns.offset, leaf.fp.offset, leaf.fp2.offset)
        key_size, leaf_size = ctypes.sizeof(table.Key), ctypes.sizeof(leaf)
        chunks = self._batches(table.map_fd, key_size, leaf_size)
        try:
            first = next(chunks, None)
        except OSError:  # kernels before 5.6 have no batch lookup
            for key, value in table.items():
                yield bytes(key), value.count, value.first_ns, value.last_ns, value.fp, value.fp2
            return
        for keys, values, n in itertools.chain((first,) if first else (), chunks):
            for i in range(n):
                base = i * leaf_size
                count, first_ns, last_ns, fp, fp2 = (_U64.unpack_from(values, base + off)[0] for off in offsets)
                yield keys[i * key_size : (i + 1) * key_size], count, first_ns, last_ns, fp, fp2

    def _batches(self, fd: int, key_size: int, leaf_size: int) -> Iterator[tuple[bytes, Any, int]]:
        """BPF_MAP_LOOKUP_BATCH until the map is exhausted: (keys bytes, values buffer, entries)."""
        from bcc.libbcc import lib

        if self._batch is None:
            self._batch = (
                ctypes.create_string_buffer(key_size * SYNC_BATCH),
                ctypes.create_string_buffer(leaf_size * SYNC_BATCH),
            )
        keys, values = self._batch
        token_in, token_out, count = ctypes.c_uint32(0), ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        while True:
            count.value = SYNC_BATCH
            start = None if first else ctypes.byref(token_in)
            res = lib.bpf_lookup_batch(fd, start, ctypes.byref(token_out), keys, values, ctypes.byref(count))
            err = ctypes.get_errno()
            if res != 0 and err != errno.ENOENT:
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
            if count.value:
                yield keys.raw[: count.value * key_size], values, count.value
            if res != 0:  # ENOENT: every entry has been read
                return
            token_in.value, first = token_out.value, False

    def stats(self) -> InputStats:
        if self.bpf is None:
            return InputStats()
        table = self.bpf["stats"]
        # perf buffer losses are already counted in the kernel when perf_submit fails. Connects are
        # not counted apart: sync hands each flow's count to the flow table, which adds them up.
        return InputStats(
            events_lost=int(table.sum(STAT_EVENTS_LOST).value), map_full=int(table.sum(STAT_MAP_FULL).value)
        )

    def close(self) -> None:
        for link in self._links:
            os.close(link)
        self._links = []
        if self._legacy_attached:
            from bcc import BPF

            for fn, cgroup_fd, attach_type in self._legacy_attached:
                BPF.detach_func(fn, cgroup_fd, attach_type)
            self._legacy_attached = []
        if self._cgroup_fd is not None:
            os.close(self._cgroup_fd)
            self._cgroup_fd = None
        if self._lines is not None:
            self._lines.close()
            self._lines = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


PLUGIN = Plugin(
    name="ebpf",
    kind="input",
    description="New TCP connections and UDP destinations from the kernel via eBPF (BCC), with the DNS "
    "names behind them; repeats counted in the kernel.",
    factory=EbpfInput,
    options=(
        Option(
            "probe",
            "TCP attach path: auto picks the cheapest per connect that loads: the cgroup connect hooks "
            "(cgroup v2 and ring buffer: one run per connect, source address unknown), else fentry, else "
            "kprobes, else the tracepoint (the only one that sees the source address)",
            "auto",
            ("auto", "fentry", "kprobe", "cgroup", "tracepoint"),
        ),
        Option(
            "buffer",
            "event buffer: auto picks the ring buffer when the kernel has it (5.8+)",
            "auto",
            ("auto", "ringbuf", "perf"),
        ),
        Option(
            "udp",
            "UDP path: auto picks the cgroup connect/sendmsg hooks (cgroup v2 and ring buffer), "
            "else syscall tracepoints; off traces TCP only",
            "auto",
            ("auto", "cgroup", "syscalls", "off"),
        ),
        Option(
            "dns",
            "names behind addresses from the DNS answers the host receives (cgroup v2 and ring buffer); "
            "auto: on where the kernel allows it. Its program runs for every packet the host receives: "
            "off saves that on hosts that receive very many",
            "auto",
            ("auto", "on", "off"),
        ),
        Option(
            "max_flows",
            "flows the kernel map holds; beyond that each connect is sent to user space and counted",
            "65536",
            convert=lambda v: _at_most(positive_int(v), MAX_FLOWS_LIMIT),
            valid=f"a whole number from 1 to {MAX_FLOWS_LIMIT}",
        ),
        Option(
            "count_lines",
            "64-byte lines in which the kernel counts repeats of known flows, one cache line per connect "
            "(a power of two, or off); auto: one per two flows the map holds. Ring buffer kernels only",
            "auto",
            convert=lambda v: _count_lines_option(v),
            valid=f"auto, off or a power of two up to {MAX_FLOWS_LIMIT}, e.g. 4096",
        ),
        Option(
            "pages",
            "pages of the event buffer (a power of two); a burst of new flows larger than it holds is "
            "counted as lost events and recovered from the kernel's flow map",
            "256",
            convert=lambda v: _power_of_two(v),
            valid="a power of two, e.g. 64",
        ),
    ),
    example="-i ebpf -I ebpf:probe:tracepoint",
)


def count_lines(option: str | int, max_flows: int, buffer: str) -> int:
    """Count lines to build: 0 for none. auto: one per two flows the map holds, the flows rounded up
    to a power of two (a slot per flow, 2 MB at the default 65,536). The array's size is what a
    repeat pays for when many flows come in turn: 4 MB cost a 10,000-flow load up to 85 ns more
    per connect than 1-2 MB here (docs/decisions/count-line-index.md). A flow whose line is full is
    counted in the map, as exactly. They need mmap-able arrays (5.5), which every kernel with the
    ring buffer (5.8) has."""
    if buffer != "ringbuf" or option in ("off", 0):
        return 0
    if option == "auto":
        return max(1, (1 << max(0, max_flows - 1).bit_length()) // 2)
    return int(option)


def count_line_flags(lines: int) -> tuple[tuple[int, ...], list[str]]:
    """Fresh fingerprint keys (twelve 32-bit NH keys, drawn at each start and written nowhere but the
    compiler's input) and the compiler flags that build `lines` count lines with them."""
    keys = tuple(int.from_bytes(os.urandom(4), "little") for _ in range(12))
    line = [f"-DEA_COUNT_LINES={lines}", f"-DEA_LINE_BITS={line_bits(lines)}", f"-DEA_LINE_MUL={LINE_MUL:#x}ULL"]
    return keys, [*line, *(f"-DEA_FP_K{i}={k:#x}U" for i, k in enumerate(keys))]


def identity_flags() -> list[str]:
    """Compiler flags that read a connect's process name and uid from the current task (offsets from
    the kernel's BTF: task_fields.py); none where the kernel lacks them, and the helpers read them."""
    fields = task_fields()
    return fields.cflags() if fields is not None else []


def _count_lines_option(value: str) -> str | int:
    return value if value in ("auto", "off") else _at_most(_power_of_two(value), MAX_FLOWS_LIMIT)


def _at_most(number: int, limit: int) -> int:
    if number > limit:
        raise ValueError(f"at most {limit}")
    return number


def _power_of_two(value: str) -> int:
    number = positive_int(value)
    if number & (number - 1):
        raise ValueError("a power of two")
    return number


__all__ = ["PLUGIN", "EbpfInput", "plan_attach"]
