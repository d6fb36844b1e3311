"""The eBPF input: bpf/*.bpf.c through BCC, as one compiled object.

TCP connects (cgroup connect hooks, fentry, kprobes or tracepoint), UDP destinations (cgroup
sock_addr hooks or syscall tracepoints) and DNS answers (cgroup_skb ingress). Repeats of
a flow are counted in the kernel: in the flow map, and once sync() has given
the flow a slot, in its count line (count_lines.py); only a flow's first
connect in a generation of the flow map arrives as an event (decoded by
decode.py). sync() flips the generation, folds what the old one counted into
the flow table and recovers any flow whose event was lost (generations.py).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from egress_auditor.attribution.names import DnsNames
from egress_auditor.errors import AuditorError
from egress_auditor.host import actions, facts
from egress_auditor.inputs import Emit, InputStats, OnCount
from egress_auditor.inputs.ebpf import build
from egress_auditor.inputs.ebpf.build import count_line_flags, count_lines_for
from egress_auditor.inputs.ebpf.count_lines import CountLines
from egress_auditor.inputs.ebpf.decode import EVENT_MAP_FULL, STAT_EVENTS_LOST, STAT_MAP_FULL, Decoder
from egress_auditor.inputs.ebpf.generations import FlowGenerations, GenerationLedger
from egress_auditor.inputs.ebpf.plan import AttachPlan, plan_attach
from egress_auditor.model import Connection
from egress_auditor.plugins import Option, Plugin, positive_int

FLIP_CHECK = 128  # connections handed over between checks: the caller may spend 100 us and more on each
# Flows (and count lines) a kernel map may be asked for: a flow map entry takes about 200 bytes of kernel memory.
MAX_FLOWS_LIMIT = 1 << 24
POLL_BATCH = 1024  # events made into Connections per poll: a burst waits in the kernel's buffer, not in Python
RECOVER_BATCH = 256  # flows recovered from taken generations per poll: a backlog waits in a queue
SYNC_PASSES = 3  # a sync settles generations taken while it runs too, a few times at most


class EbpfInput:
    name = "ebpf"

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.bpf: Any = None
        self.plan: AttachPlan | None = None
        self.names = DnsNames()  # the DNS answers read are learned here: the run names connections (enrich.py)
        self._decoder: Decoder | None = None
        self._ledger: GenerationLedger | None = None
        self._read_upto_ns = 0  # every event written before this CLOCK_MONOTONIC time has been read
        self._pending: list[Connection] = []
        self._batch_full = False  # the last poll stopped at POLL_BATCH: more may wait in the ring buffer
        self._last_event_ns = 0
        self.cgroup = build.CgroupAttachment()
        self._command_cgroup: tuple[int, int] | None = None  # (id, depth): see restrict_to_cgroup
        self._lines: CountLines | None = None
        self.fingerprint_key: tuple[int, ...] = ()  # the 12 NH keys of the count lines' fingerprints
        self.identity_from_task = False  # names and uids read from the task through BTF, not by helpers
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: this maps it to wall time.
        self._epoch_offset = time.time() - time.monotonic()

    def open(self) -> str:
        problem = facts.environment_problem()
        if problem:
            raise AuditorError(problem)
        mounted = ""
        if facts.tracefs() is None and self.options["probe"] not in ("kprobe", "fentry"):
            if actions.mount_tracefs() is None:
                raise AuditorError(
                    "tracefs is not mounted and could not be: mount -t tracefs tracefs /sys/kernel/tracing"
                )
            mounted = "; mounted tracefs at /sys/kernel/tracing"
        self.plan = plan_attach(self.options["probe"], self.options["buffer"], self.options["udp"], self.options["dns"])
        src = build.bpf_source_dir()
        cflags = [
            f"-I{src}",
            f"-DEA_MAX_FLOWS={self.options['max_flows']}",
            f"-DEA_RINGBUF_PAGES={self.options['pages']}",
        ]
        if self._command_cgroup is not None:
            cflags += ["-DEA_CGROUP_FILTER", f"-DEA_CGROUP_ID={self._command_cgroup[0]}ULL"]
            cflags.append(f"-DEA_CGROUP_LEVEL={self._command_cgroup[1]}")
        lines = count_lines_for(self.options["count_lines"], self.options["max_flows"], self.plan.buffer)
        if lines:
            self.fingerprint_key, line_flags = count_line_flags(lines)
            cflags += line_flags
        identity = build.identity_flags()
        try:
            self.bpf = self._build_plan(src, cflags, identity)
            if lines:
                self._lines = CountLines(self.bpf["count_lines"].map_fd, lines)
            self._bind(FlowGenerations(self.bpf))
            if self.plan.tcp_hook == "kprobe":
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
            return self._build(build.program_text(self.plan.pieces(), src), [*self.plan.cflags(), *cflags], identity)
        except Exception as exc:  # BCC raises bare Exception for compile and load failures
            if not self.plan.dns or self.options["dns"] != "auto":
                raise
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            note = f"; no DNS names: their program did not load ({why})"
            self.plan = dataclasses.replace(self.plan, dns=False, reason=self.plan.reason + note)
        return self._build(build.program_text(self.plan.pieces(), src), [*self.plan.cflags(), *cflags], identity)

    def _build(self, text: bytes, cflags: list[str], identity: list[str]) -> Any:
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

    def _load(self, text: bytes, cflags: list[str]) -> Any:
        assert self.plan is not None
        return build.load(self.plan, text, cflags)

    @property
    def path(self) -> str:
        """The attach paths in use, by their short names (after open())."""
        return self.plan.short() if self.plan is not None else ""

    @property
    def lines(self) -> CountLines | None:
        """The count lines in use, if any (none on kernels without the ring buffer, or when turned off)."""
        return self._lines

    def learn_names(self, names: DnsNames) -> None:
        """Before open(): feed the DNS answers read into the run's name cache."""
        self.names = names

    def restrict_to_cgroup(self, cgroup_id: int, depth: int) -> None:
        """Before open(): count only connects from this cgroup v2 and below it (trace -- CMD)."""
        self._command_cgroup = (cgroup_id, depth)

    def _attach_cgroup(self, programs: tuple[tuple[str, str, str], ...]) -> None:
        assert self.plan is not None and self.plan.cgroup_root is not None
        self.cgroup.attach(self.bpf, self.plan.cgroup_root, programs)

    def _bind(self, gens: FlowGenerations) -> None:
        """The decoder and generations' ledger of the loaded object, whose flow map is in `gens`."""
        flows = self.bpf["flows"]
        self._decoder = Decoder(flows.Key, self.name, self._epoch_offset)
        self._ledger = GenerationLedger(gens, flows, self._events_lost)

    def _events_lost(self) -> int:
        return int(self.bpf["stats"].sum(STAT_EVENTS_LOST).value)

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> int:
        assert self._decoder is not None and self._ledger is not None
        event = self.bpf["events"].event(data)
        if event.flags != EVENT_MAP_FULL:
            if self._ledger.is_settled(event.epoch):
                # Read after its generation was drained (its record was behind one still being
                # written): the flow was recovered from the map then, with this very connect.
                return 0
            self._ledger.announce(event.epoch, self._decoder.raw_key(event))
        self._pending.append(self._decoder.connection(event))
        self._last_event_ns = event.ts_ns
        # Below zero, libbpf stops reading the ring buffer (this event is kept); perf buffers ignore it.
        self._batch_full = len(self._pending) >= POLL_BATCH
        return -1 if self._batch_full else 0

    def _on_dns(self, _ctx: Any, data: Any, _size: int) -> None:
        build.learn_answer(self.names, self.bpf["dns_events"].event(data), self._epoch_offset)

    def poll(self, timeout_s: float, emit: Emit) -> None:
        self._poll(timeout_s, emit, recover=False)

    def _poll(self, timeout_s: float, emit: Emit, recover: bool) -> None:
        """Events first: flows recovered from the map wait while more events do (`recover`: not)."""
        if self.plan is None or self.bpf is None or self._ledger is None:
            return
        self._read_events(timeout_s)
        self._maybe_flip()
        self._ledger.settle(self._read_upto_ns)
        pending, self._pending = self._pending, []
        for i, conn in enumerate(pending, 1):
            emit(conn)
            if i % FLIP_CHECK == 0:
                self._maybe_flip()
        if recover or not self._batch_full:
            self._emit_recovered(emit, RECOVER_BATCH)

    def _read_events(self, timeout_s: float) -> None:
        assert self.plan is not None
        ms = max(0, int(timeout_s * 1000))
        began = time.monotonic_ns()
        self._batch_full = False
        if self.plan.buffer == "ringbuf":
            if ms:
                self.bpf.ring_buffer_poll(ms)
            # Read every ring, ready or not: the kernel wakes a reader of each ring on its own and
            # later (irq_work), so epoll may report a connect before the DNS answer that led to it.
            # The answer was written first; the DNS ring is read after the connects, so it is here.
            if not ms or self.plan.dns:
                self.bpf.ring_buffer_consume()
        else:
            self.bpf.perf_buffer_poll(ms)  # reads every CPU's buffer whole
        if self.plan.buffer != "ringbuf" or not self._batch_full:
            self._read_upto_ns = began
        else:  # stopped at a batch: the ring is read up to the last event taken
            self._read_upto_ns = max(self._read_upto_ns, self._last_event_ns)

    def _drain(self, cutoff_ns: int, emit: Emit) -> None:
        """Emit every event written before cutoff_ns, a batch at a time."""
        while self._read_upto_ns < cutoff_ns:
            self.poll(0, emit)

    def _maybe_flip(self) -> None:
        assert self._ledger is not None
        if self._ledger.flip_due(self.options["max_flows"]):
            self._ledger.flip()

    def _emit_recovered(self, emit: Emit, limit: int) -> None:
        assert self._decoder is not None and self._ledger is not None
        recover = self._ledger.recover
        for i in range(1, min(limit, len(recover)) + 1):
            emit(self._decoder.recovered(*recover.popleft()))
            if i % FLIP_CHECK == 0:
                self._maybe_flip()

    def sync(self, emit: Emit, on_count: OnCount) -> None:
        """Flip the flow map's generation and settle every generation taken so far: flows whose
        event was lost are emitted from the map, then `on_count` gets each flow's connections beyond
        the one its event (or recovery) carried, and those counted in count lines since.

        A flip returns once no program can count in the old generation any more, so every event
        counted there is in the buffer or lost: the buffer is read up to the flip first, and a key
        with no event of its epoch by then lost it (an event still read later is dropped)."""
        if self.bpf is None or self._ledger is None:
            return
        flipped = self._ledger.flip()
        for _ in range(SYNC_PASSES):
            self._settle_up_to(flipped, emit, on_count)
            newest = self._ledger.newest_flip()
            if newest is None:  # else a burst went on: flipped again meanwhile
                break
            flipped = newest
        if self._lines is not None:
            self._fold_lines(self._lines, on_count)

    def _settle_up_to(self, flipped: int, emit: Emit, on_count: OnCount) -> None:
        """One pass of sync: read the events up to the flip, settle, recover, then fold the counts."""
        assert self._decoder is not None and self._ledger is not None
        self._drain(flipped, emit)
        self._ledger.settle(self._read_upto_ns)
        # The flows of these counts are all in the table once the recoveries queued so far are
        # emitted; events are read between batches, and generations settled meanwhile wait.
        folds = self._ledger.take_folds()
        for _ in range(-(-len(self._ledger.recover) // RECOVER_BATCH)):
            self._poll(0, emit, recover=True)
        lines = self._lines
        for raw, added, last_ns, fp, fp2 in folds:
            # A flow that repeats gets a slot in its count line: its later repeats are counted there.
            if lines is not None and fp:
                lines.claim(fp, fp2, raw)
            on_count(self._decoder.flow_key(raw), added, self._decoder.wall_time(last_ns))

    def _fold_lines(self, lines: CountLines, on_count: OnCount) -> None:
        """Connects counted in count lines since the last sync (their flows have left the map)."""
        assert self._decoder is not None
        for slot in lines.claimed:
            total = lines.count(slot)
            if total != lines.reported[slot]:
                added, lines.reported[slot] = total - lines.reported[slot], total
                owner = lines.owner[slot]
                assert owner is not None
                on_count(self._decoder.flow_key(owner), added, self._decoder.wall_time(lines.last_ns(slot)))

    def stats(self) -> InputStats:
        if self.bpf is None:
            return InputStats()
        # perf buffer losses are already counted in the kernel when perf_submit fails. Connects are
        # not counted apart: sync hands each flow's count to the flow table, which adds them up.
        return InputStats(events_lost=self._events_lost(), map_full=int(self.bpf["stats"].sum(STAT_MAP_FULL).value))

    def close(self) -> None:
        self.cgroup.close()
        if self._lines is not None:
            self._lines.close()
            self._lines = None
        self._ledger = None
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
            "flows each of the kernel map's two generations holds; sync drains one while the other "
            "counts, and beyond that each connect is sent to user space and counted",
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
