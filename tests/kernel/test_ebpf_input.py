"""EbpfInput against the running kernel: the real BPF program, real clients in
the client namespace, real servers (or closed ports answering RST) in the
server namespace. The tracepoint is global, so every check filters on this
test's own destination addresses, ports and pids; the lost-event bound
assumes no other process floods the host with new flows meanwhile (CI runs
tests one by one)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from fingerprint import nh_fingerprint
from netns import Link, Namespace, http_server

from egress_auditor.capture.flows import FlowTable, flow_key
from egress_auditor.errors import AuditorError
from egress_auditor.host import facts
from egress_auditor.inputs.ebpf import PLUGIN, EbpfInput, bpf_source_dir, plan_attach, program_text
from egress_auditor.model import Connection, Family, FlowKey, Transport

HTTP_PORT = 18080
NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
NOBODY_UID = NOBODY_GID = 65534
# Lost-event checks allow this many unrelated connects from the rest of the host.
BACKGROUND_SLACK = 100
# Buffer pages for tests not about losses: other programs' new flows must not crowd out this test's.
ROOMY = 2048

# A socket client: connects (from a second thread when asked), reports who it was.
CLIENT = r"""
import json, os, socket, sys, threading, time
spec = json.loads(sys.argv[1])
if spec.get("cpu") is not None:
    os.sched_setaffinity(0, {spec["cpu"]})
family = socket.AF_INET if spec["family"] == 4 else socket.AF_INET6
result = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "connected": 0, "refused": 0}
with open("/proc/self/comm") as f:
    result["comm"] = f.read().strip()

def connect_all():
    result["tid"] = threading.get_native_id()
    for port in spec["ports"]:
        for _ in range(spec["repeats"]):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect((spec["host"], port))
                result["connected"] += 1
            except ConnectionRefusedError:
                result["refused"] += 1
            finally:
                s.close()
            if spec.get("pace"):
                time.sleep(spec["pace"])

if spec["thread"]:
    worker = threading.Thread(target=connect_all)
    worker.start()
    worker.join()
else:
    connect_all()
print(json.dumps(result))
"""


@dataclass(repr=False)
class Received:
    """What an input handed over: events from poll(), flows and counts from sync()."""

    events: list[Connection] = field(default_factory=list)
    synced: list[Connection] = field(default_factory=list)
    added: dict[FlowKey, int] = field(default_factory=dict)  # connects sync() reported beyond the events

    @property
    def counts(self) -> dict[FlowKey, int]:
        """Each flow's connects, as the flow table adds them up: one per event or recovered flow,
        plus what the kernel counted beyond them."""
        totals = dict(self.added)
        for conn in (*self.events, *self.synced):
            key = flow_key(conn)
            totals[key] = totals.get(key, 0) + conn.connections
        return totals

    def __repr__(self) -> str:
        # Short: the tracer sees the whole host, and a failing assert prints this.
        return f"Received({len(self.events)} events, {len(self.synced)} synced, last {self.events[-3:]})"

    def to(self, dst: str, dport: int | None = None) -> list[Connection]:
        address = ipaddress.ip_address(dst)
        return [c for c in self.events if c.dst == address and (dport is None or c.dport == dport)]

    def sync(self, source: EbpfInput) -> None:
        source.sync(self.synced.append, lambda key, n, _last: self.added.__setitem__(key, self.added.get(key, 0) + n))


def poll_until(source: EbpfInput, received: Received, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll the input until predicate() holds or timeout seconds pass; the last answer."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        source.poll(0.05, received.events.append)
    return True


def drain(source: EbpfInput, received: Received, quiet: float = 0.3) -> None:
    """Poll until the buffer stays empty for `quiet` seconds (bounded at 5 s)."""
    deadline = time.monotonic() + 5.0
    seen, quiet_since = len(received.events), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet:
        source.poll(0.05, received.events.append)
        if len(received.events) != seen:
            seen, quiet_since = len(received.events), time.monotonic()


@pytest.fixture
def open_input() -> Iterator[Callable[..., EbpfInput]]:
    """Opens EbpfInputs with option overrides; closes them after the test."""
    opened: list[EbpfInput] = []

    def factory(**overrides: Any) -> EbpfInput:
        source = EbpfInput(PLUGIN.defaults() | overrides)
        opened.append(source)
        source.open()
        return source

    yield factory
    for source in opened:
        source.close()


def run_client(
    ns: Namespace,
    family: int,
    host: str,
    ports: Sequence[int],
    repeats: int = 1,
    thread: bool = False,
    as_nobody: bool = False,
    cpu: int | None = None,
) -> dict[str, Any]:
    spec = {"family": family, "host": host, "ports": list(ports), "repeats": repeats, "thread": thread, "cpu": cpu}
    prefix = NOBODY if as_nobody else ()
    done = ns.run([*prefix, sys.executable, "-c", CLIENT, json.dumps(spec)])
    return json.loads(done.stdout)


def run_curl(ns: Namespace, url: str, as_nobody: bool = False) -> int:
    """curl in ns; its pid (ip netns exec and setpriv exec, so the pid is curl's)."""
    prefix = NOBODY if as_nobody else ()
    proc = ns.popen([*prefix, "curl", "-sS", "-o", "/dev/null", "--max-time", "5", url])
    assert proc.wait(timeout=10) == 0, f"curl {url} failed"
    return proc.pid


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root", "nobody"])
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("client", ["curl", "python"])
def test_connect_is_reported_with_process_and_destination(
    open_input: Callable[..., EbpfInput], net: Link, client: str, family: int, as_nobody: bool
) -> None:
    source = open_input(pages=ROOMY)
    dst = net.b4 if family == 4 else net.b6
    with http_server(net.b, HTTP_PORT):
        if client == "curl":
            pid = run_curl(net.a, url(dst, HTTP_PORT), as_nobody)
            comm = "curl"
        else:
            # The connect happens in a second thread: the event must still name the process.
            info = run_client(net.a, family, dst, [HTTP_PORT], thread=True, as_nobody=as_nobody)
            assert info["connected"] == 1
            assert info["tid"] != info["pid"]
            pid, comm = info["pid"], info["comm"]
    received = Received()
    assert poll_until(source, received, lambda: any(c.pid == pid for c in received.to(dst, HTTP_PORT)))
    ours = received.to(dst, HTTP_PORT)
    assert len(ours) == 1, ours
    event = ours[0]
    uid = NOBODY_UID if as_nobody else 0
    assert (event.pid, event.uid, event.gid, event.comm) == (pid, uid, NOBODY_GID if as_nobody else 0, comm)
    assert event.family is (Family.IPV4 if family == 4 else Family.IPV6)
    assert event.protocol is Transport.TCP
    # The default path here, the cgroup connect hook, runs before the source address is chosen.
    assert (event.src, event.sport) == (None, None)
    assert event.process.pid == pid and event.process.name == comm
    assert abs(event.time - time.time()) < 30


def test_ipv4_mapped_ipv6_connect_is_reported_as_ipv4(open_input: Callable[..., EbpfInput], net: Link) -> None:
    source = open_input(pages=ROOMY)
    mapped = f"::ffff:{net.b4}"
    with http_server(net.b, HTTP_PORT):
        info = run_client(net.a, 6, mapped, [HTTP_PORT])
    assert info["connected"] == 1
    received = Received()
    assert poll_until(source, received, lambda: bool(received.to(net.b4, HTTP_PORT)))
    drain(source, received)
    ours = received.to(net.b4, HTTP_PORT)
    assert len(ours) == 1
    assert ours[0].family is Family.IPV4 and ours[0].pid == info["pid"]
    assert received.to(mapped) == []


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_tracepoint_path_reports_the_source_address(
    open_input: Callable[..., EbpfInput], net: Link, family: int
) -> None:
    source = open_input(pages=ROOMY, probe="tracepoint")
    assert source.plan is not None and source.plan.tcp_hook == "tracepoint"
    src, dst = (net.a4, net.b4) if family == 4 else (net.a6, net.b6)
    with http_server(net.b, HTTP_PORT):
        pid = run_curl(net.a, url(dst, HTTP_PORT))
    received = Received()
    assert poll_until(source, received, lambda: any(c.pid == pid for c in received.to(dst, HTTP_PORT)))
    drain(source, received)
    ours = received.to(dst, HTTP_PORT)
    assert [(c.pid, c.comm, c.src) for c in ours] == [(pid, "curl", ipaddress.ip_address(src))]


def test_a_tcp_connect_is_counted_once_on_each_path(open_input: Callable[..., EbpfInput], net: Link) -> None:
    """The cgroup hook runs once per connect(); the tracepoint once per CLOSE->SYN_SENT: the same count."""
    cgroup = open_input(pages=ROOMY, probe="cgroup")
    tracepoint = open_input(pages=ROOMY, probe="tracepoint")
    repeats = 7
    with http_server(net.b, HTTP_PORT):
        info = run_client(net.a, 6, net.b6, [HTTP_PORT], repeats=repeats)
    assert info["connected"] == repeats
    key = FlowKey(Transport.TCP, Family.IPV6, ipaddress.ip_address(net.b6), HTTP_PORT, 0, info["comm"])
    for source in (cgroup, tracepoint):
        received = Received()
        assert poll_until(source, received, lambda got=received: bool(got.to(net.b6, HTTP_PORT)))
        drain(source, received)
        received.sync(source)
        assert [c.pid for c in received.to(net.b6, HTTP_PORT)] == [info["pid"]]
        assert received.counts[key] == repeats


def test_repeats_give_one_event_and_an_exact_kernel_count(open_input: Callable[..., EbpfInput], net: Link) -> None:
    source = open_input(pages=ROOMY)
    repeats = 25
    with http_server(net.b, HTTP_PORT):
        info = run_client(net.a, 4, net.b4, [HTTP_PORT], repeats=repeats)
    assert info["connected"] == repeats
    received = Received()
    assert poll_until(source, received, lambda: bool(received.to(net.b4, HTTP_PORT)))
    drain(source, received)
    assert len(received.to(net.b4, HTTP_PORT)) == 1
    received.sync(source)
    key = FlowKey(Transport.TCP, Family.IPV4, ipaddress.ip_address(net.b4), HTTP_PORT, 0, info["comm"])
    assert received.counts[key] == repeats
    # The flow was announced by its event: sync() must not hand it over again.
    assert [c for c in received.synced if c.dst == key.dst] == []


@pytest.mark.parametrize("buffer", ["ringbuf", "perf"])
def test_lost_events_are_counted_and_their_flows_recovered_by_sync(
    open_input: Callable[..., EbpfInput], net: Link, buffer: str, capfd: pytest.CaptureFixture[str]
) -> None:
    source = open_input(pages=1, buffer=buffer)
    burst = range(20000, 23000)
    # Closed ports answer RST, but the connect has passed SYN_SENT: each port is a flow.
    # One CPU: the perf buffer is per CPU, and its lost record goes out with that CPU's next event.
    info = run_client(net.a, 4, net.b4, burst, cpu=0)
    assert info["refused"] == len(burst)
    assert source.stats().events_lost > 0
    received = Received()
    drain(source, received)
    # One more flow, polled: the perf buffer reports its earlier losses only now.
    run_client(net.a, 4, net.b4, [23000], cpu=0)
    assert poll_until(source, received, lambda: bool(received.to(net.b4, 23000)))
    drain(source, received)
    received.sync(source)

    address = ipaddress.ip_address(net.b4)
    delivered = [c.dport for c in received.events if c.dst == address and c.dport in burst]
    recovered = [c.dport for c in received.synced if c.dst == address and c.dport in burst]
    assert recovered, "nothing was lost: the burst did not overflow the buffer"
    assert sorted(delivered + recovered) == list(burst), "a flow is missing or emitted twice"
    assert all(c.pid is None and c.comm == info["comm"] for c in received.synced if c.dst == address)
    counted = {k.dport: n for k, n in received.counts.items() if k.dst == address and k.dport in burst}
    assert counted == dict.fromkeys(burst, 1)
    lost = source.stats().events_lost
    assert len(recovered) <= lost < len(recovered) + BACKGROUND_SLACK, "each lost event counted once"
    # The input accounts for losses itself: nothing (BCC's "Possibly lost N samples") goes to stderr.
    assert "lost" not in capfd.readouterr().err.lower()


def test_full_flow_map_sends_connects_one_by_one_and_counts_stay_exact(
    open_input: Callable[..., EbpfInput], net: Link
) -> None:
    max_flows, flows, repeats = 16, 40, 3
    source = open_input(max_flows=max_flows, pages=ROOMY)
    ports = range(21000, 21000 + flows)
    info = run_client(net.a, 4, net.b4, ports, repeats=repeats)
    assert info["refused"] == flows * repeats
    received = Received()
    assert poll_until(source, received, lambda: {c.dport for c in received.to(net.b4)} >= set(ports))
    drain(source, received)
    # Fold as the trace run does: events add up, kernel counts of mapped flows replace theirs.
    address = ipaddress.ip_address(net.b4)
    table = FlowTable()
    for conn in received.events:
        table.add(conn)
    in_map: set[int] = set()

    def fold(key: FlowKey, added: int, last_seen: float) -> None:
        if key.dst == address:
            in_map.add(key.dport)
        table.add_kernel_count(key, added, last_seen)

    source.sync(received.synced.append, fold)
    assert [c for c in received.synced if c.dst == address] == []
    ours = {f.key.dport: f.connections for f in table if f.key.dst == address}
    assert ours == dict.fromkeys(ports, repeats)
    assert len(in_map) <= max_flows
    # Every connect of a flow outside the map crossed as its own event.
    outside = [c for c in received.events if c.dst == address and c.dport not in in_map]
    assert len(outside) == (flows - len(in_map)) * repeats
    assert source.stats().map_full >= len(outside)


def test_perf_buffer_path_delivers_events(open_input: Callable[..., EbpfInput], net: Link) -> None:
    source = open_input(buffer="perf", pages=ROOMY)
    assert source.plan is not None and source.plan.buffer == "perf"
    with http_server(net.b, HTTP_PORT):
        pid4 = run_curl(net.a, url(net.b4, HTTP_PORT))
        pid6 = run_curl(net.a, url(net.b6, HTTP_PORT))
    received = Received()
    assert poll_until(
        source, received, lambda: bool(received.to(net.b4, HTTP_PORT)) and bool(received.to(net.b6, HTTP_PORT))
    )
    assert [c.pid for c in received.to(net.b4, HTTP_PORT)] == [pid4]
    assert [c.pid for c in received.to(net.b6, HTTP_PORT)] == [pid6]


def test_auto_plan_chooses_the_cgroup_hooks_and_ring_buffer() -> None:
    plan = plan_attach("auto", "auto")
    assert (plan.tcp_hook, plan.buffer) == ("cgroup", "ringbuf")
    assert "cheapest" in plan.reason
    assert plan.describe().startswith("TCP: cgroup connect4/6 hooks at /")


def test_without_the_ring_buffer_auto_falls_back_to_the_tracepoint() -> None:
    plan = plan_attach("auto", "perf")
    assert (plan.tcp_hook, plan.buffer, plan.udp) == ("tracepoint", "perf", "syscalls")
    assert "no ring buffer" in plan.reason
    with pytest.raises(AuditorError) as asked:
        plan_attach("cgroup", "perf")
    assert "ebpf:probe:cgroup" in str(asked.value) and "\n" not in str(asked.value)


def test_asking_for_kprobes_fails_with_one_line(open_input: Callable[..., EbpfInput]) -> None:
    with pytest.raises(AuditorError) as planned:
        plan_attach("kprobe", "auto")
    with pytest.raises(AuditorError) as opened:
        open_input(probe="kprobe")
    for error in (planned.value, opened.value):
        message = str(error)
        assert "kprobe" in message and "\n" not in message
        assert error.exit_status == 1


def test_asking_for_fentry_where_the_kernel_refuses_it_fails_with_its_reason(
    open_input: Callable[..., EbpfInput],
) -> None:
    """This kernel answers EPERM to an fentry program (tests/vm run the path on kernels that allow it)."""
    usable, why = facts.fentry_usable()
    assert not usable and "Operation not permitted" in why, why
    with pytest.raises(AuditorError) as opened:
        open_input(probe="fentry")
    message = str(opened.value)
    assert "ebpf:probe:fentry" in message and why in message and "\n" not in message
    assert why in plan_attach("auto", "perf").reason, "auto (no cgroup hooks without the ring buffer) says why not"


def test_kprobe_variant_compiles_and_passes_the_verifier() -> None:
    from bcc import BPF  # imported here: collecting this file must not need BCC

    src = bpf_source_dir()
    bpf = BPF(
        text=program_text(("tcp_connect.bpf.c",), src),
        cflags=[f"-I{src}", "-DEA_PATH_KPROBE", "-DEA_USE_RINGBUF"],
    )
    try:
        for name in (b"trace_v4", b"trace_v6"):
            assert bpf.load_func(name, BPF.KPROBE).fd >= 0
    finally:
        bpf.cleanup()


def flow_entries(source: EbpfInput, dst: str, port: int) -> list[tuple[bytes, Any]]:
    """The (raw key, value) of this test's destination in both generations of the flow map."""
    address = ipaddress.ip_address(dst).packed
    return [
        (bytes(key), value)
        for name in ("flows", "flows_next")
        for key, value in source.bpf[name].items()
        if key.family and bytes(key.daddr)[: len(address)] == address and key.dport == port
    ]


def our_flow_entry(source: EbpfInput, dst: str, port: int) -> tuple[bytes, Any]:
    """The flow map's (raw key, value) for this test's destination: one entry, in either generation."""
    found = flow_entries(source, dst, port)
    assert len(found) == 1, f"{len(found)} entries for {dst}:{port} in the flow map"
    return found[0]


def test_repeats_after_a_sync_are_counted_in_the_flows_count_line_exactly(
    open_input: Callable[..., EbpfInput], net: Link
) -> None:
    source = open_input(pages=ROOMY)
    lines = source.lines
    assert lines is not None and lines.lines == 32768, "auto: a line per two flows the map holds"
    port, first, later = 21500, 5, 7
    info = run_client(net.a, 4, net.b4, [port], repeats=first)
    assert info["refused"] == first
    received = Received()
    assert poll_until(source, received, lambda: bool(received.to(net.b4, port)))
    raw, value = our_flow_entry(source, net.b4, port)
    received.sync(source)  # the flow repeated: it gets a slot, and leaves the map with the drained generation
    key = FlowKey(Transport.TCP, Family.IPV4, ipaddress.ip_address(net.b4), port, 0, info["comm"])
    assert received.counts[key] == first
    assert flow_entries(source, net.b4, port) == []

    # The kernel's fingerprint is the two NH sums of the key under this run's keys.
    assert len(source.fingerprint_key) == 12
    assert (value.fp, value.fp2) == nh_fingerprint(source.fingerprint_key, raw)
    slot = lines.claim(value.fp, value.fp2, raw)  # its own slot comes back
    assert slot is not None and lines.owner[slot] == raw
    assert lines.count(slot) == 0

    run_client(net.a, 4, net.b4, [port], repeats=later)
    received.sync(source)
    assert received.counts[key] == first + later
    assert lines.count(slot) == later, "the repeats after the claim were counted in the line"
    assert flow_entries(source, net.b4, port) == [], "counted in its line, the flow never re-entered the map"
    received.sync(source)  # nothing new: nothing handed over again, nothing lost
    assert received.counts[key] == first + later
    assert len(received.to(net.b4, port)) == 1


def test_a_full_count_line_leaves_flows_in_the_map_with_exact_counts(
    open_input: Callable[..., EbpfInput], net: Link
) -> None:
    source = open_input(pages=ROOMY, count_lines=1)  # one line: two slots for the whole host
    lines = source.lines
    assert lines is not None and lines.lines == 1
    ports, repeats = range(21600, 21606), 3
    run_client(net.a, 4, net.b4, ports, repeats=repeats)
    received = Received()
    assert poll_until(source, received, lambda: {c.dport for c in received.to(net.b4)} >= set(ports))
    received.sync(source)
    assert len(lines.claimed) == 2, "both slots taken by the first flows that repeated"
    key_type = source.bpf["flows"].Key
    address = ipaddress.ip_address(net.b4)
    held: dict[int, int] = {}  # port -> slot of our flows that hold one (another flow of the host may)
    for slot in lines.claimed:
        key = key_type.from_buffer_copy(lines.owner[slot])
        if bytes(key.daddr)[:4] == address.packed and key.dport in ports:
            held[key.dport] = slot
    run_client(net.a, 4, net.b4, ports, repeats=repeats)
    received.sync(source)
    counted = {k.dport: n for k, n in received.counts.items() if k.dst == address}
    assert counted == dict.fromkeys(ports, 2 * repeats)
    for port in ports:
        assert flow_entries(source, net.b4, port) == [], "every generation counted in was drained"
        in_line = lines.count(held[port]) if port in held else 0
        events = len([c for c in (*received.events, *received.synced) if c.dst == address and c.dport == port])
        # A flow without a slot entered the next generation anew: one more event.
        assert (in_line, events) == ((repeats, 1) if port in held else (0, 2)), port


def test_count_lines_off_counts_in_the_map_alone(open_input: Callable[..., EbpfInput], net: Link) -> None:
    source = open_input(pages=ROOMY, count_lines="off")
    assert source.lines is None and source.fingerprint_key == ()
    port = 21700
    info = run_client(net.a, 4, net.b4, [port], repeats=4)
    received = Received()
    assert poll_until(source, received, lambda: bool(received.to(net.b4, port)))
    received.sync(source)
    run_client(net.a, 4, net.b4, [port], repeats=4)
    value = our_flow_entry(source, net.b4, port)[1]
    assert (value.fp, value.fp2) == (0, 0), "no fingerprint without count lines"
    drain(source, received)
    received.sync(source)
    key = FlowKey(Transport.TCP, Family.IPV4, ipaddress.ip_address(net.b4), port, 0, info["comm"])
    assert received.counts[key] == 8


@pytest.mark.parametrize("count_lines", ["auto", "off"])
def test_thousands_of_flows_pass_through_a_small_flow_map_with_exact_counts(
    open_input: Callable[..., EbpfInput], net: Link, count_lines: str
) -> None:
    """Far more distinct flows than a generation holds, polled as the trace run does, then synced:
    each flow present once, each count exact, and a flow that connects between every two new
    flows, across every flip, counted exactly (off: in the map, re-entering each generation).
    Paced so that a sync can follow a generation this small (a flip alone takes about 8 ms here);
    the benchmark's soak drives bursts at full speed into the default size."""
    max_flows = 256
    source = open_input(max_flows=max_flows, pages=ROOMY, count_lines=count_lines)
    ports = range(24000, 27000)
    keep = 23999
    spec = {"family": 4, "host": net.b4, "ports": [p for port in ports for p in (port, keep)], "repeats": 1}
    spec |= {"thread": False, "cpu": None, "pace": 0.0003}
    client = net.a.popen([sys.executable, "-c", CLIENT, json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    received = Received()
    while client.poll() is None:
        source.poll(0.005, received.events.append)  # flips the generation as it fills
    info = json.loads(client.communicate()[0])
    assert info["refused"] == 2 * len(ports)
    drain(source, received)
    received.sync(source)

    address = ipaddress.ip_address(net.b4)
    ours = {k.dport: n for k, n in received.counts.items() if k.dst == address and k.comm == info["comm"]}
    assert ours == {**dict.fromkeys(ports, 1), keep: len(ports)}
    assert source._ledger is not None and source._ledger.gens.epoch > len(ports) // max_flows, "flipped as they filled"
    recovered = [c for c in received.synced if c.dst == address and c.pid is None]
    assert len(recovered) <= source.stats().events_lost
    assert source.stats().map_full == 0, "no generation filled up"
