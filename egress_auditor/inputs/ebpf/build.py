"""Building the eBPF input's one BPF object: the C pieces of bpf/ joined into
one compile unit, and the -D flags that options and the running kernel
(count lines, task offsets from BTF) give it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egress_auditor.host import facts
from egress_auditor.host.btf import task_fields
from egress_auditor.host.compiler import bpf_source_dir, compile_bpf, compile_unit
from egress_auditor.inputs.ebpf.count_lines import LINE_MUL, line_bits
from egress_auditor.inputs.ebpf.plan import AttachPlan

if TYPE_CHECKING:
    from egress_auditor.attribution.names import DnsNames

# bpf(2) command and flag for cgroup programs (uapi/linux/bpf.h).
_BPF_LINK_CREATE = 28
_BPF_F_ALLOW_MULTI = 2

# Before every program: where events leave (the one choice of ring or perf buffer), then the flow map.
SHARED_PIECES = ("output.bpf.c", "flow_map.bpf.c")


def program_text(pieces: tuple[str, ...], src: Path | None = None) -> bytes:
    """One compile unit: the event output and the shared flow map first, then each program in use.

    BCC rewrites map calls and builds tracepoint argument structs only in its
    main text, so the pieces that use maps are joined, not #included; the
    map-free helpers are headers they #include (bpf/*.bpf.h).
    """
    return compile_unit((*SHARED_PIECES, *pieces), src or bpf_source_dir())


def count_lines_for(option: str | int, max_flows: int, buffer: str) -> int:
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
    the kernel's BTF: host/btf.py); none where the kernel lacks them, and the helpers read them."""
    fields = task_fields()
    return fields.cflags() if fields is not None else []


def load(plan: AttachPlan, text: bytes, cflags: list[str]) -> Any:
    """Compile, and load the cgroup programs (BCC keeps them for the attach): the verifier
    answers here, before anything is attached."""
    from bcc import BPF, BPFAttachType  # imported late: `list` and `doctor` work without BCC

    built = compile_bpf(text, cflags)
    try:
        for function, prog_type, attach_name in plan.cgroup_programs():
            attach_type = getattr(BPFAttachType, attach_name)
            built.load_func(function.encode(), getattr(BPF, prog_type), attach_type=attach_type)
    except Exception:
        built.cleanup()
        raise
    return built


class CgroupAttachment:
    """Programs attached at a cgroup v2 directory: through BPF links (5.7+: closing them detaches,
    even on SIGKILL), beside any programs already there; without links, with BPF_F_ALLOW_MULTI."""

    def __init__(self) -> None:
        self.links: list[int] = []  # bpf_link fds
        self._legacy: list[tuple[Any, int, int]] = []  # (fn, cgroup fd, type) attached without a link
        self._cgroup_fd: int | None = None

    def attach(self, built: Any, root: str | Path, programs: tuple[tuple[str, str, str], ...]) -> None:
        from bcc import BPF, BPFAttachType

        if self._cgroup_fd is None:
            self._cgroup_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        for function, prog_type, attach_name in programs:
            attach_type = getattr(BPFAttachType, attach_name)
            fn = built.load_func(function.encode(), getattr(BPF, prog_type), attach_type=attach_type)
            try:
                self.links.append(facts.bpf_syscall(_BPF_LINK_CREATE, [fn.fd, self._cgroup_fd, attach_type, 0]))
            except OSError:
                BPF.attach_func(fn, self._cgroup_fd, attach_type, _BPF_F_ALLOW_MULTI)
                self._legacy.append((fn, self._cgroup_fd, attach_type))

    def close(self) -> None:
        """Detach every program, and close the cgroup; safe to call again."""
        for link in self.links:
            os.close(link)
        self.links = []
        if self._legacy:
            from bcc import BPF

            for fn, cgroup_fd, attach_type in self._legacy:
                BPF.detach_func(fn, cgroup_fd, attach_type)
            self._legacy = []
        if self._cgroup_fd is not None:
            os.close(self._cgroup_fd)
            self._cgroup_fd = None


def learn_answer(names: DnsNames, event: Any, epoch_offset: float) -> None:
    """A DNS answer from the DNS ring (bpf/dns.bpf.c) into the name cache; its time on the wall clock."""
    names.learn(bytes(event.data)[: event.len], event.pid, event.ts_ns / 1e9 + epoch_offset)
