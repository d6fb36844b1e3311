"""The `doctor` report: one check per thing the tool may use, with what was found and its fix.

Built from the host's facts (facts.py); a required check that fails makes `doctor` exit 1.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from egress_auditor.host import facts
from egress_auditor.host.btf import task_fields

TRACEPOINTS = (("sock", "inet_sock_set_state"),)
BINARIES = ("iptables", "ip6tables", "iptables-restore", "nft")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def checks() -> list[Check]:
    """Every check, in the order the report shows them."""
    privileged = facts.has_bpf_privileges()
    kprobes_ok, kprobes_detail = facts.kprobes_usable()
    cgroup_root = facts.cgroup2_root()
    return [
        *_toolchain(privileged),
        *_tcp_hooks(kprobes_ok, kprobes_detail, cgroup_root),
        _syscall_tracepoints(),
        *_task_reads(),
        *([_ring_buffer()] if privileged else []),  # creating a map needs the privileges
        *_binaries(),
    ]


def _toolchain(privileged: bool) -> list[Check]:
    """What every eBPF path needs: privileges, BCC, kernel headers, tracefs."""
    headers = facts.kernel_headers_dir()
    root = facts.tracefs()
    return [
        Check(
            "root or CAP_BPF+CAP_PERFMON",
            privileged,
            "yes" if privileged else f"uid {os.geteuid()}, capabilities missing",
            "run as root: sudo egress-auditor ...",
        ),
        Check(
            "BCC Python bindings",
            facts.bcc_importable(),
            "import bcc",
            "apt-get install python3-bpfcc (and use a venv with --system-site-packages)",
        ),
        Check(
            "kernel headers",
            headers is not None,
            str(headers or f"/lib/modules/{os.uname().release}/build missing"),
            facts.headers_fix(),
        ),
        Check("tracefs", root is not None, str(root or "not mounted"), "mount -t tracefs tracefs /sys/kernel/tracing"),
    ]


def _tcp_hooks(kprobes_ok: bool, kprobes_detail: str, cgroup_root: Path | None) -> list[Check]:
    """Where TCP connects can be seen: kprobes, fentry, the tracepoint, the cgroup hooks."""
    result = [
        Check(
            "kprobes",
            kprobes_ok,
            kprobes_detail,
            "none needed: TCP is seen at the cgroup connect hooks (or the tracepoint) instead",
            required=False,
        ),
        Check(
            "fentry (BPF trampolines)",
            *facts.fentry_usable(),
            "none needed: kprobes, the cgroup connect hooks or the tracepoint are used instead",
            required=False,
        ),
    ]
    for category, event in TRACEPOINTS:
        exists = facts.tracepoint_exists(category, event)
        result.append(
            Check(
                f"tracepoint {category}:{event}",
                exists,
                "present" if exists else "absent or tracefs not mounted",
                "mount tracefs; the kernel needs CONFIG_TRACEPOINTS (4.16+)",
                # Without kprobes or cgroup v2, TCP needs sock:inet_sock_set_state.
                required=not kprobes_ok and cgroup_root is None,
            )
        )
    result.append(
        Check(
            "cgroup v2 (TCP connect, UDP and DNS hooks)",
            cgroup_root is not None,
            str(cgroup_root or "not mounted"),
            "mount -t cgroup2 none /sys/fs/cgroup/unified (else TCP falls back to the tracepoint, UDP to "
            "syscall tracepoints)",
            required=False,
        )
    )
    return result


def _syscall_tracepoints() -> Check:
    present = facts.syscall_tracepoints_exist()
    return Check(
        "syscall tracepoints (UDP fallback)",
        present,
        "present" if present else "absent (CONFIG_FTRACE_SYSCALLS not set?)",
        "none needed where cgroup v2 and the ring buffer are there",
        required=False,
    )


def _task_reads() -> list[Check]:
    """What the programs read from the task through BTF rather than by slower means."""
    stack_argv = facts.kernel_has_helpers("get_current_task_btf", "task_pt_regs")
    fields = task_fields()
    return [
        Check(
            "command lines read at exec (bpf_task_pt_regs)",
            stack_argv,
            "from the new program's stack" if stack_argv else "absent: read at execve entry instead",
            "kernel 5.15+ with BTF; else syscall tracepoints are used, which slow every syscall of the host "
            "by about 10 ns while tracing (or run with --no-lineage)",
            required=False,
        ),
        Check(
            "names and uids read from the task (kernel BTF)",
            fields is not None,
            f"task_struct.comm at byte {fields.comm}, .cred at {fields.cred}" if fields else "absent: read by helpers",
            "kernel 5.11+ with BTF (CONFIG_DEBUG_INFO_BTF) and libbpf 0.5+; else two helpers read them, "
            "about 70 ns more per connect",
            required=False,
        ),
    ]


def _ring_buffer() -> Check:
    ring = facts.ringbuf_supported()
    return Check(
        "BPF ring buffer",
        ring,
        "yes" if ring else "no (kernel before 5.8)",
        "none needed: the perf buffer is used instead",
        required=False,
    )


def _binaries() -> list[Check]:
    """The firewall tools the written rules are loaded with."""
    fix = "apt-get install iptables nftables"
    paths = {binary: shutil.which(binary) for binary in BINARIES}
    return [Check(f"{b} binary", p is not None, p or "not found", fix, required=False) for b, p in paths.items()]
