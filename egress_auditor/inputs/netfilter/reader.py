"""What the nflog and nfqueue inputs share: options, rule setup and clean-up,
a reader thread, loss counting and socket attribution.

A reader thread owns the netlink socket: it receives, gives NFQUEUE its
ACCEPT verdicts at once, and hands messages to poll() through a bounded
backlog. So a slow main thread (attribution, the live table) never holds a
packet back, and the socket buffer is emptied as fast as Python can.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from egress_auditor.errors import AuditorError
from egress_auditor.host import facts
from egress_auditor.inputs import Emit, InputBase, InputStats
from egress_auditor.inputs.netfilter import packets
from egress_auditor.inputs.netfilter.netlink import NetfilterSocket, NetlinkError
from egress_auditor.inputs.netfilter.sockets import SocketTable
from egress_auditor.inputs.netfilter.taps import Firewall, Owner, Target
from egress_auditor.model import Attribution, Connection, Process, Transport
from egress_auditor.plugins import Option

if TYPE_CHECKING:
    from egress_auditor.attribution.names import DnsNames
    from egress_auditor.inputs.ebpf.dns_answers import DnsAnswers

UNKNOWN = "unknown"  # the name of a process whose socket was gone before it could be matched
MAX_BACKLOG = 16384  # datagrams waiting for poll(); beyond that they are dropped (sequence gaps count them)
MAX_BATCH = 256  # datagrams decoded per poll() call, so the display and signals stay responsive
READ_WAIT_S = 0.2  # how long the reader thread blocks before it looks at the stop flag
SEQ_MOD = 1 << 32
REPEAT_WINDOW_S = {Transport.TCP: 130.0, Transport.UDP: 30.0}  # SYN retries end after ~127 s; unreplied UDP: 30 s
MAX_RECENT = 65536
CAP_NET_ADMIN = 12


def can_admin_network() -> bool:
    return bool(facts.effective_capabilities() & (1 << CAP_NET_ADMIN))


@dataclass(frozen=True)
class Received:
    """A packet copy from the kernel, before it is parsed: seq is NFULA_SEQ or the queue's packet id."""

    seq: int | None
    payload: bytes
    uid: int | None
    gid: int | None
    at: float


def setup_option(kind: str) -> Option:
    return Option(
        "setup",
        "none: use rules you added yourself; auto: install tagged rules (TCP SYN and UDP, state NEW, "
        "IPv4 and IPv6) through nft or iptables, whichever the host uses, and remove them on exit; "
        f"iptables or nft: that tool only. Any setup also removes {kind} rules left by a killed run",
        "none",
        ("none", "auto", "iptables", "nft"),
    )


def rcvbuf_option(default: str) -> Option:
    def convert(value: str) -> int:
        number = int(value)
        if number < 0:
            raise ValueError("a byte count, 0 for the kernel's default")
        return number

    return Option(
        "rcvbuf",
        "receive buffer of the netlink socket in bytes (0: the kernel's default); a small one loses "
        "messages in a burst, and the loss is counted",
        default,
        convert=convert,
        valid="a byte count, e.g. 4194304",
    )


def dns_option() -> Option:
    return Option(
        "dns",
        "auto: names behind addresses from the DNS answers the host receives, read by the eBPF input's "
        "DNS program loaded alone (cgroup v2, ring buffer and BCC), else a one-line note; off: addresses only",
        "auto",
        ("auto", "off"),
    )


class LossCounter:
    """Sequence numbers that should run without gaps: each gap is messages the kernel could not deliver."""

    def __init__(self) -> None:
        self.expected: int | None = None
        self.lost = 0

    def see(self, seq: int | None) -> None:
        if seq is None:
            return
        if self.expected is not None:
            gap = (seq - self.expected) % SEQ_MOD
            if gap < SEQ_MOD // 2:  # a number from before is a restart or reordering, not a loss
                self.lost += gap
        self.expected = (seq + 1) % SEQ_MOD


class NetfilterInput(InputBase):
    """Base of the nflog and nfqueue inputs: subclasses bind the socket and read one message kind."""

    name = ""
    kind = ""  # "nflog" or "nfqueue"

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.target = Target(self.kind, self.number)
        self.firewall: Firewall | None = None
        self.sockets = SocketTable()
        self.losses = LossCounter()
        self.connections = 0
        self.ignored = 0  # packets that were not a connection's start (a broad rule of the user's)
        self.retransmits = 0  # SYN retransmits, and UDP packets before the first reply (conntrack still says NEW)
        self._recent: OrderedDict[tuple[Any, ...], float] = OrderedDict()
        self.backlog_dropped = 0
        self._backlog: deque[tuple[float, bytes]] = deque()  # (time received, datagram)
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader_error: BaseException | None = None
        self._closed = False
        self._names: DnsNames | None = None  # the run's name cache (learn_names)
        self._dns: DnsAnswers | None = None

    @property
    def number(self) -> int:
        raise NotImplementedError

    # -- what subclasses provide ---------------------------------------------------
    def bind(self) -> NetfilterSocket:
        raise NotImplementedError

    def read(self, timeout_s: float) -> list[bytes]:
        """Receive datagrams (NFQUEUE also accepts their packets): runs in the reader thread, so it does little."""
        raise NotImplementedError

    def decode(self, at: float, datagram: bytes) -> list[Received]:
        """The packet copies in one datagram: runs in poll()."""
        raise NotImplementedError

    def manual_hint(self) -> str:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    # -- the Input protocol ----------------------------------------------------------
    def open(self) -> str:
        if not can_admin_network():
            raise AuditorError(f"-i {self.kind} needs root or CAP_NET_ADMIN: run it with sudo")
        try:
            socket_ = self.bind()
        except PermissionError:
            raise AuditorError(f"-i {self.kind} needs root or CAP_NET_ADMIN: run it with sudo") from None
        except NetlinkError as exc:
            raise AuditorError(self.bind_problem(exc)) from None
        parts = [self.describe_socket(socket_)]
        atexit.register(self.close)  # a second line of defence: TraceRun closes inputs on every exit it sees
        if self.options["setup"] != "none":
            self.firewall = Firewall(self.target, Owner.current(self.kind))
            removed = self.firewall.remove_leftovers()
            if removed:
                runs = ", ".join(sorted({f"pid {o.pid}" for o in removed}))
                parts.append(f"removed {len(removed)} rule(s) left by killed run(s) ({runs})")
            parts.insert(1, self.firewall.install(self.options["setup"]))
        else:
            parts.append(f"setup:none, rules are yours, e.g. {self.manual_hint()}")
        if self._names is not None and self.options.get("dns", "off") == "auto":
            parts.append(self._open_dns(self._names))
        self._thread = threading.Thread(target=self._read_loop, name=f"{self.kind}-reader", daemon=True)
        self._thread.start()
        return "; ".join(parts)

    def learn_names(self, names: DnsNames) -> None:
        self._names = names

    def _open_dns(self, names: DnsNames) -> str:
        """The DNS program alone, feeding the run's names; where it cannot run, a note and no names."""
        from egress_auditor.inputs.ebpf.dns_answers import DnsAnswers  # BCC only where names are wanted

        answers = DnsAnswers(names)
        try:
            described = answers.open()
        except AuditorError as exc:
            return f"no DNS names: {exc}"
        self._dns = answers
        return described

    def bind_problem(self, exc: NetlinkError) -> str:
        return f"could not bind {self.kind} {self.number}: {exc.strerror}"

    def describe_socket(self, socket_: NetfilterSocket) -> str:
        return f"{self.kind} {self.number}, receive buffer {socket_.rcvbuf} bytes"

    def _read_loop(self) -> None:
        try:
            while not self._stop.is_set():
                datagrams = self.read(READ_WAIT_S)
                if not datagrams:
                    continue
                at = time.time()
                received = [(at, d) for d in datagrams]
                with self._ready:
                    room = MAX_BACKLOG - len(self._backlog)
                    if room < len(received):
                        self.backlog_dropped += len(received) - max(room, 0)
                        received = received[: max(room, 0)]
                    self._backlog.extend(received)
                    self._ready.notify()
        except BaseException as exc:  # reported by the next poll(): a dead reader must not go unnoticed
            self._reader_error = exc
            with self._ready:
                self._ready.notify()

    def poll(self, timeout_s: float, emit: Emit) -> None:
        with self._ready:
            if not self._backlog and self._reader_error is None and timeout_s > 0:
                self._ready.wait(timeout_s)
            batch = [self._backlog.popleft() for _ in range(min(len(self._backlog), MAX_BATCH))]
        if self._reader_error is not None:
            error, self._reader_error = self._reader_error, None
            raise AuditorError(f"{self.kind} reader stopped: {error}") from error
        if self._dns is not None:
            self._dns.poll()  # the answers that led to these packets were received before they left
        starts: list[tuple[Received, packets.Packet]] = []
        for item in (r for at, datagram in batch for r in self.decode(at, datagram)):
            self.losses.see(item.seq)
            packet = packets.parse(item.payload)
            if packet is None or not packet.is_connection_start:
                self.ignored += 1
                continue
            if self._repeated(packet, item.at):
                self.retransmits += 1
                continue
            starts.append((item, packet))
        owners = self.sockets.owners([p for _, p in starts]) if starts else []
        for (item, packet), owner in zip(starts, owners, strict=True):
            self.connections += 1
            emit(self._connection(item, packet, owner))

    def _repeated(self, packet: packets.Packet, at: float) -> bool:
        """A SYN retransmit (same 5-tuple and sequence number), or UDP before a reply: not a new connection."""
        key = (packet.protocol, packet.src, packet.sport, packet.dst, packet.dport, packet.tcp_seq)
        seen = self._recent.pop(key, None)
        self._recent[key] = at
        if len(self._recent) > MAX_RECENT:
            self._recent.popitem(last=False)
        return seen is not None and at - seen < REPEAT_WINDOW_S[packet.protocol]

    def _connection(self, item: Received, packet: packets.Packet, owner: Any) -> Connection:
        uid = item.uid if item.uid is not None else (owner.uid if owner else -1)
        gid = item.gid
        if owner is not None:
            process = Process(pid=owner.pid, name=owner.comm, uid=uid, attribution=Attribution.SOCKET, gid=gid)
        else:
            process = Process(pid=None, name=UNKNOWN, uid=uid, attribution=Attribution.NAME_ONLY, gid=gid)
        return Connection(
            time=item.at,
            protocol=packet.protocol,
            family=packet.family,
            src=packet.src,
            sport=packet.sport,
            dst=packet.dst,
            dport=packet.dport,
            pid=process.pid,
            uid=uid,
            gid=gid,
            comm=process.name,
            input=self.name,
            process=process,
        )

    def lost(self) -> int:
        overruns = self.socket_overruns()
        # Each ENOBUFS report stands for at least one lost message; gaps give the exact number when seen
        # (datagrams dropped from a full backlog leave gaps too).
        return max(self.losses.lost, overruns, self.backlog_dropped)

    def socket_overruns(self) -> int:
        raise NotImplementedError

    def stats(self) -> InputStats:
        dns_lost = self._dns.lost() if self._dns is not None else 0
        return InputStats(connections=self.connections, events_lost=self.lost() + dns_lost)

    def close(self) -> None:
        """Rules first (nothing new arrives), then the reader (NFQUEUE accepts what is queued), then the socket."""
        if self._closed:
            return
        self._closed = True
        problems = []
        if self.firewall is not None:
            try:
                self.firewall.remove()
            except Exception as exc:  # the socket must still be released
                problems.append(f"removing rules: {exc}")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * READ_WAIT_S)
        self.release()
        if self._dns is not None:
            self._dns.close()
            self._dns = None
        if problems:
            raise AuditorError("; ".join(problems))
