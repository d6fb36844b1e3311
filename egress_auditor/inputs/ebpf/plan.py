"""Where the eBPF input attaches: a plan made from what the host offers
(host/facts.py), with no side effect but asking the kernel about fentry.

The TCP hook is the cheapest per connect that loads here; UDP and DNS
follow what the kernel allows (docs/inputs.md, docs/decisions/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from egress_auditor.errors import AuditorError
from egress_auditor.host import facts

# (function, program type, attach type) of the programs attached at the cgroup v2 root.
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
    tcp_hook: str  # where TCP connects are seen: a key of TCP_HOOKS
    buffer: str  # "ringbuf" or "perf"
    reason: str
    udp: str = "off"  # "cgroup", "syscalls" or "off"
    dns: bool = False
    cgroup_root: str | None = None  # where the cgroup programs attach
    udp_send_tp: bool = False  # cgroup UDP: first sends of connected sockets at sock:sock_send_length

    def describe(self) -> str:
        parts = [TCP_HOOKS[self.tcp_hook] + (f" at {self.cgroup_root}" if self.tcp_hook == "cgroup" else "")]
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
        paths = [SHORT_PATHS[self.tcp_hook], *((SHORT_PATHS[self.udp],) if self.udp != "off" else ())]
        return " + ".join([*dict.fromkeys(paths), *(("DNS",) if self.dns else ())])

    def pieces(self) -> tuple[str, ...]:
        """The programs in use, each after the pieces whose maps and helpers it calls."""
        return (
            *(("dns.bpf.c",) if self.dns else ()),
            *(("udp_send.bpf.c",) if self.udp != "off" else ()),
            "tcp_connect.bpf.c",
            *(("cgroup_hooks.bpf.c",) if self.cgroup_programs() else ()),
        )

    def cgroup_programs(self) -> tuple[tuple[str, str, str], ...]:
        """(function, program type, attach type) of each program to attach at the cgroup root."""
        programs: list[tuple[str, str, str]] = []
        if self.tcp_hook == "cgroup" or self.udp == "cgroup":
            programs += CONNECT_PROGRAMS
        if self.udp == "cgroup":
            programs += UDP_PROGRAMS
            if not self.udp_send_tp:
                programs.append(UDP_EGRESS_PROGRAM)
        if self.dns:
            programs.append(INGRESS_PROGRAM)
        return tuple(programs)

    def cflags(self) -> list[str]:
        flags = [f"-DEA_PATH_{self.tcp_hook.upper()}"]
        if self.buffer == "ringbuf":
            flags.append("-DEA_USE_RINGBUF")
        if self.udp != "off":
            flags.append(f"-DEA_UDP_{self.udp.upper()}")
        if self.dns:
            flags.append("-DEA_DNS")
        if self.udp == "cgroup" and self.udp_send_tp:
            flags.append("-DEA_UDP_SEND_TP")
        return flags


def _why_not_cgroup(cgroup_root: Path | None) -> str:
    """Why the cgroup programs cannot be used, when they cannot."""
    return "no cgroup v2 mount" if cgroup_root is None else "no ring buffer"


def _plan_udp(udp: str, ring_ok: bool, cgroup_root: Path | None) -> tuple[str, str]:
    """The UDP path and why: cgroup hooks need cgroup v2 and the ring buffer."""
    syscalls_ok = facts.syscall_tracepoints_exist()
    cgroup_ok = cgroup_root is not None and ring_ok
    why_not_cgroup = _why_not_cgroup(cgroup_root)
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


def _plan_buffer(buffer: str, ring_ok: bool) -> str:
    """The event buffer: the ring buffer where asked for, or with auto where the kernel has it."""
    if buffer == "ringbuf" and not ring_ok:
        raise AuditorError("-I ebpf:buffer:ringbuf: this kernel has no BPF ring buffer (5.8+); use perf or auto")
    return "ringbuf" if buffer == "ringbuf" or (buffer == "auto" and ring_ok) else "perf"


def _plan_tcp(probe: str, cgroup_ok: bool, why_not_cgroup: str) -> tuple[str, str]:
    """The TCP hook and why: the one asked for if it is usable here, else with auto the cheapest."""
    kprobes_ok, kprobes_why = facts.kprobes_usable()
    tracepoint_ok = facts.tracepoint_exists("sock", "inet_sock_set_state")
    # Tried only when it may be chosen: it loads (and attaches) a program.
    asked_or_next = probe == "fentry" or (probe == "auto" and not cgroup_ok)
    fentry_ok, fentry_why = facts.fentry_usable() if asked_or_next else (False, "")
    if probe == "fentry":
        if not fentry_ok:
            raise AuditorError(f"-I ebpf:probe:fentry: {fentry_why}; use ebpf:probe:kprobe, cgroup, tracepoint or auto")
        return "fentry", "asked for fentry"
    if probe == "kprobe":
        if not kprobes_ok:
            raise AuditorError(f"-I ebpf:probe:kprobe: {kprobes_why}; use ebpf:probe:cgroup, tracepoint or auto")
        return "kprobe", "asked for kprobes"
    if probe == "cgroup":
        if not cgroup_ok:
            raise AuditorError(f"-I ebpf:probe:cgroup: {why_not_cgroup}; use ebpf:probe:tracepoint or auto")
        return "cgroup", "asked for the cgroup connect hooks"
    if probe == "tracepoint":
        if not tracepoint_ok:
            raise AuditorError(
                "-I ebpf:probe:tracepoint: sock:inet_sock_set_state not found (kernel 4.16+ and tracefs needed)"
            )
        return "tracepoint", "asked for the tracepoint"
    # auto: the cheapest path per connect that loads here, by the programs' run times measured side
    # by side on Debian's stock kernels (docs/benchmarks.md): the cgroup hook (its program reads the
    # address from its context, and UDP's hooks share it), fentry, kprobes, the tracepoint.
    if cgroup_ok:
        return "cgroup", "auto: the cheapest per connect"
    if fentry_ok:
        return "fentry", f"auto: for the cgroup hooks {why_not_cgroup}"
    if kprobes_ok:
        return "kprobe", f"auto: for the cgroup hooks {why_not_cgroup}; {fentry_why}"
    if tracepoint_ok:
        return "tracepoint", f"auto: for the cgroup hooks {why_not_cgroup}, {fentry_why}, {kprobes_why}"
    raise AuditorError(
        f"no TCP connect hook: for the cgroup hooks {why_not_cgroup}, {fentry_why}, {kprobes_why}, and "
        "tracepoint sock:inet_sock_set_state is missing (mount -t tracefs tracefs /sys/kernel/tracing)"
    )


def _plan_dns(dns: str, dns_ok: bool) -> bool:
    """Whether DNS answers are read: on needs cgroup v2 and the ring buffer, auto takes them where there."""
    if dns == "on" and not dns_ok:
        raise AuditorError("-I ebpf:dns:on: DNS answers need cgroup v2 and the BPF ring buffer; use auto or off")
    # auto: on where the kernel allows it, for callers that want names without failing
    return dns == "on" or (dns == "auto" and dns_ok)


def plan_attach(probe: str, buffer: str, udp: str = "auto", dns: str = "off") -> AttachPlan:
    """Decide the attach paths and buffer from what the kernel offers."""
    ring_ok = facts.ringbuf_supported()
    chosen = _plan_buffer(buffer, ring_ok)
    cgroup_root = facts.cgroup2_root()
    # The cgroup programs (and the DNS one among them) use helpers that came with the ring buffer (5.8).
    cgroup_ok = cgroup_root is not None and chosen == "ringbuf"
    path, reason = _plan_tcp(probe, cgroup_ok, _why_not_cgroup(cgroup_root))
    if buffer == "auto" and not ring_ok:
        reason += "; no ring buffer before 5.8"
    udp_path, udp_why = _plan_udp(udp, chosen == "ringbuf", cgroup_root)
    use_dns = _plan_dns(dns, cgroup_ok)
    if udp_path != "cgroup" or dns != "auto" or not use_dns:
        reason += f"; {udp_why}" + (
            "" if use_dns or dns == "off" else "; no DNS names: needs cgroup v2 and ring buffer"
        )
    # Raw tracepoints need no tracefs, but its format file tells whether the kernel has this one.
    send_tp = udp_path == "cgroup" and facts.tracepoint_exists("sock", "sock_send_length")
    return AttachPlan(
        path, chosen, reason, udp_path, use_dns, str(cgroup_root) if cgroup_root else None, udp_send_tp=send_tp
    )
