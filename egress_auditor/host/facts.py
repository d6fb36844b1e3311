"""What this host offers: privileges, BCC, headers, tracefs, hooks, BPF features.

Read-only: probes that load a BPF program or create a map close it at once.
Used by `doctor` (doctor.py), by the eBPF input to choose its attach path, and
to turn a missing piece into one line that says how to fix it. What the tool
changes on the host is in actions.py.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import platform
from pathlib import Path

from egress_auditor.host.btf import function_btf_ids

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
KPROBE_FUNCTIONS = ("tcp_v4_connect", "tcp_v6_connect")
SYSCALL_TRACEPOINTS = (("enter", "sendto"), ("enter", "sendmsg"), ("enter", "connect"), ("exit", "connect"))
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}
_BPF_MAP_CREATE = 0
_BPF_MAP_TYPE_RINGBUF = 27


def effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_bpf_privileges() -> bool:
    caps = effective_capabilities()
    if caps & (1 << CAP_SYS_ADMIN):
        return True
    return bool(caps & (1 << CAP_BPF)) and bool(caps & (1 << CAP_PERFMON))


def bcc_importable() -> bool:
    return importlib.util.find_spec("bcc") is not None


def kernel_headers_dir() -> Path | None:
    build = Path("/lib/modules") / os.uname().release / "build"
    return build if (build / "include").is_dir() else None


def tracefs() -> Path | None:
    for path in TRACEFS_CANDIDATES:
        try:
            if (path / "events").is_dir():
                return path
        except OSError:  # EACCES for a non-root user: is_dir() only hides ENOENT
            continue
    return None


def tracepoint_exists(category: str, event: str) -> bool:
    root = tracefs()
    return root is not None and (root / "events" / category / event / "format").exists()


def syscall_tracepoints_exist() -> bool:
    """The syscall tracepoints UDP falls back to (CONFIG_FTRACE_SYSCALLS)."""
    return all(tracepoint_exists("syscalls", f"sys_{edge}_{call}") for edge, call in SYSCALL_TRACEPOINTS)


def kernel_has_kprobes() -> bool:
    """The kprobe PMU (what BCC attaches through) exists only with CONFIG_KPROBES."""
    return Path("/sys/bus/event_source/devices/kprobe/type").exists()


def kernel_function_exists(name: str) -> bool:
    try:
        with open("/proc/kallsyms", encoding="ascii", errors="replace") as symbols:
            return any(line.split()[2] == name for line in symbols if line.count(" ") >= 2)
    except OSError:
        return False


def kernel_has_helpers(*names: str) -> bool:
    """Whether the kernel knows these BPF helpers: their enum bpf_func_id entries, in the kernel's
    BTF (which the BTF-typed helpers need anyway). Without BTF, False."""
    try:
        btf = Path("/sys/kernel/btf/vmlinux").read_bytes()
    except OSError:
        return False
    return all(f"BPF_FUNC_{name}\0".encode() in btf for name in names)


def kprobes_usable() -> tuple[bool, str]:
    if not kernel_has_kprobes():
        return False, "the kernel has no kprobes (CONFIG_KPROBES not set)"
    missing = [f for f in KPROBE_FUNCTIONS if not kernel_function_exists(f)]
    if missing:
        return False, f"kernel functions not found: {', '.join(missing)}"
    return True, "kprobes on " + " / ".join(KPROBE_FUNCTIONS)


_BPF_PROG_LOAD, _BPF_RAW_TRACEPOINT_OPEN = 5, 17
_BPF_PROG_TYPE_TRACING, _BPF_TRACE_FENTRY = 26, 24
_EMPTY_PROGRAM = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = 0; exit
_GPL = b"GPL\0"


def fentry_usable() -> tuple[bool, str]:
    """Load an empty fentry program on each function the TCP path needs, attach it and detach it
    at once: the kernel's own answer (trampolines, BTF, and a policy that lets them load)."""
    ids = function_btf_ids(KPROBE_FUNCTIONS)
    if ids is None:
        return False, "no kernel BTF (or libbpf too old to read it)"
    missing = [name for name, type_id in zip(KPROBE_FUNCTIONS, ids, strict=True) if type_id <= 0]
    if missing:
        return False, f"kernel functions not in BTF: {', '.join(missing)}"
    insns = ctypes.create_string_buffer(_EMPTY_PROGRAM, len(_EMPTY_PROGRAM))
    licence = ctypes.create_string_buffer(_GPL, len(_GPL))
    for name, type_id in zip(KPROBE_FUNCTIONS, ids, strict=True):
        fields = [0] * 28
        fields[0], fields[1] = _BPF_PROG_TYPE_TRACING, len(_EMPTY_PROGRAM) // 8
        fields[2:4] = _u64_words(ctypes.addressof(insns))
        fields[4:6] = _u64_words(ctypes.addressof(licence))
        fields[17], fields[27] = _BPF_TRACE_FENTRY, type_id  # expected_attach_type, attach_btf_id
        try:
            prog = bpf_syscall(_BPF_PROG_LOAD, fields)
        except OSError as exc:
            return False, f"fentry program refused on {name}: {exc.strerror}"
        try:
            os.close(bpf_syscall(_BPF_RAW_TRACEPOINT_OPEN, [0, 0, prog]))
        except OSError as exc:
            return False, f"fentry attach refused on {name}: {exc.strerror}"
        finally:
            os.close(prog)
    return True, "fentry on " + " / ".join(KPROBE_FUNCTIONS)


def _u64_words(value: int) -> list[int]:
    return [value & 0xFFFFFFFF, value >> 32]


def bpf_syscall(command: int, fields: list[int]) -> int:
    """bpf(2) with a union bpf_attr whose leading u32 fields are `fields`;
    returns the result (a new fd for the commands used here) or raises OSError."""
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    attr = (ctypes.c_uint32 * 30)(*fields)  # zeroed past the fields set
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(number, command, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def ringbuf_supported() -> bool:
    """Create (and close) a BPF ring buffer map: the kernel's own answer (5.8+)."""
    try:
        fd = bpf_syscall(_BPF_MAP_CREATE, [_BPF_MAP_TYPE_RINGBUF, 0, 0, 4096])
    except OSError:
        return False
    os.close(fd)
    return True


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or
    /sys/fs/cgroup/unified on hosts with the hybrid layout."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        mount, _, filesystem = line.partition(" - ")
        if filesystem.split(" ", 1)[0] == "cgroup2":
            return Path(mount.split(" ")[4].replace("\\040", " "))
    return None


def headers_fix() -> str:
    release = os.uname().release
    return (
        f"apt-get install linux-headers-{release} (or, on a kernel without its own "
        f"package, link /lib/modules/{release}/build to an installed "
        "/usr/src/linux-headers-* tree)"
    )


def environment_problem() -> str | None:
    """The first thing that stops the eBPF input, as one line with its fix."""
    if not has_bpf_privileges():
        return "needs root or CAP_BPF and CAP_PERFMON: run it with sudo"
    if not bcc_importable():
        return (
            "BCC's Python bindings are not importable: apt-get install python3-bpfcc "
            "and use /usr/bin/python3 (or a venv made with --system-site-packages)"
        )
    if kernel_headers_dir() is None:
        return "no kernel headers for BCC: " + headers_fix()
    return None
