"""NFLOG and NFQUEUE over a raw NETLINK_NETFILTER socket.

Written with the socket and struct modules: no maintained Python library
speaks nfnetlink_log or nfnetlink_queue with the uid/gid, sequence and
fail-open flags this tool needs (see docs/decisions/nfnetlink-by-hand.md). Constants are
from the kernel's uapi headers linux/netfilter/nfnetlink_{log,queue}.h.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33  # root may pass net.core.rmem_max
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER
_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")
_NLATTR = struct.Struct("=HH")
_HEADERS = _NLMSGHDR.size + _NFGENMSG.size

# nfnetlink_log
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_PACKET_HDR, NFULA_PAYLOAD, NFULA_PREFIX, NFULA_UID, NFULA_SEQ, NFULA_GID = 1, 9, 10, 11, 12, 14
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH, NFULA_CFG_FLAGS = (
    1,
    2,
    3,
    4,
    5,
    6,
)
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_PF_BIND = 1, 3
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x1  # per-group sequence number in every message: gaps are losses

# nfnetlink_queue
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD, NFQA_UID, NFQA_GID = 1, 2, 10, 16, 17
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_UID_GID = 0x1, 0x8
NF_ACCEPT = 1

COPY_RANGE = 256  # IPv6 header, a few extension headers and the TCP header fit
RECV_BUFFER = 1 << 18  # one netlink datagram holds at most a batch of nlbufsiz bytes


class NetlinkError(OSError):
    pass


@dataclass(frozen=True)
class Message:
    """One nfnetlink message: its type, the nfgenmsg family and resource id, and its attributes."""

    type: int
    family: int
    res_id: int
    attrs: dict[int, bytes]


def attribute(kind: int, payload: bytes) -> bytes:
    size = _NLATTR.size + len(payload)
    return _NLATTR.pack(size, kind) + payload + b"\0" * (-size % 4)


def message(msg_type: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    size = _HEADERS + len(attrs)
    return _NLMSGHDR.pack(size, msg_type, flags, seq, 0) + _NFGENMSG.pack(family, 0, res_id) + attrs


def parse_attributes(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while offset + _NLATTR.size <= end:
        size, kind = _NLATTR.unpack_from(data, offset)
        if size < _NLATTR.size or offset + size > end:
            break
        attrs[kind & NLA_TYPE_MASK] = data[offset + _NLATTR.size : offset + size]
        offset += (size + 3) & ~3
    return attrs


def parse_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes, int, int]]:
    """(type, flags, seq, data, start, end) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        size, msg_type, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if size < _NLMSGHDR.size or offset + size > len(data):
            break
        yield msg_type, flags, seq, data, offset + _NLMSGHDR.size, offset + size
        offset += (size + 3) & ~3


class NetfilterSocket:
    """A NETLINK_NETFILTER socket: acknowledged config requests, and batches of messages."""

    def __init__(self, rcvbuf: int = 0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        if rcvbuf:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.overruns = 0  # ENOBUFS: the kernel dropped messages because the receive buffer was full
        self._seq = 0
        self._buffer = bytearray(RECV_BUFFER)
        self._early: list[bytes] = []  # packets that arrived while waiting for an ack

    @property
    def rcvbuf(self) -> int:
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def request(self, msg_type: int, family: int, res_id: int, attrs: bytes, timeout_s: float = 5.0) -> None:
        """Send a config request and wait for the kernel's answer; raises NetlinkError on refusal."""
        self._seq += 1
        seq = self._seq
        self.sock.sendall(message(msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, family, res_id, attrs))
        for _ in range(64):  # packets may already be flowing in: keep them, look for the ack
            ready, _, _ = select.select([self.sock], [], [], timeout_s)
            if not ready:
                break
            data = self._recv(0)
            if not data:
                continue
            answer = self._ack(data, seq)
            if answer is None:
                self._early.append(data)
                continue
            if answer:
                raise NetlinkError(answer, os.strerror(answer))
            return
        raise NetlinkError(errno.ETIMEDOUT, "no answer from the kernel's netfilter netlink")

    @staticmethod
    def _ack(data: bytes, seq: int) -> int | None:
        for msg_type, _flags, msg_seq, raw, start, end in parse_messages(data):
            if msg_type == NLMSG_ERROR and msg_seq == seq and end - start >= 4:
                return -struct.unpack_from("=i", raw, start)[0]
        return None

    def send(self, msg_type: int, family: int, res_id: int, attrs: bytes) -> None:
        """A message without an ack (verdicts): the answer would cost a recv per batch."""
        self._seq += 1
        self.sock.sendall(message(msg_type, NLM_F_REQUEST, self._seq, family, res_id, attrs))

    def _recv(self, flags: int) -> bytes | None:
        """One datagram; b"" when the kernel reports an overrun (ENOBUFS), None when nothing is queued."""
        try:
            size = self.sock.recv_into(self._buffer, len(self._buffer), flags)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.overruns += 1
                return b""
            raise
        return bytes(self._buffer[:size])

    def receive_raw(self, timeout_s: float, max_datagrams: int = 256) -> list[bytes]:
        """Datagrams that arrive within timeout_s, then whatever else is already queued (bounded)."""
        datagrams, self._early = self._early, []
        if not datagrams:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout_s))
            if not ready:
                return []
        for _ in range(max_datagrams):
            data = self._recv(socket.MSG_DONTWAIT)
            if data is None:
                break
            if data:
                datagrams.append(data)
        return datagrams

    def receive(self, timeout_s: float, max_datagrams: int = 256) -> list[Message]:
        return [m for data in self.receive_raw(timeout_s, max_datagrams) for m in self.decode(data)]

    @staticmethod
    def decode(data: bytes) -> Iterator[Message]:
        for msg_type, _flags, _seq, raw, start, end in parse_messages(data):
            if msg_type < 0x100 or end - start < _NFGENMSG.size:
                continue  # NOOP/ERROR/DONE: nothing to report outside request()
            family, _version, res_id = _NFGENMSG.unpack_from(raw, start)
            yield Message(msg_type, family, res_id, parse_attributes(raw, start + _NFGENMSG.size, end))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def be32(attrs: dict[int, bytes], kind: int) -> int | None:
    value = attrs.get(kind)
    return struct.unpack("!I", value[:4])[0] if value is not None and len(value) >= 4 else None


@dataclass(frozen=True)
class LoggedPacket:
    seq: int | None  # None when the group was bound without NFULNL_CFG_F_SEQ
    payload: bytes
    uid: int | None  # the socket's fsuid; None for packets without a local socket
    gid: int | None
    prefix: bytes


class NflogGroup:
    """Bound to one NFLOG group: packet copies with uid/gid and a sequence number."""

    def __init__(self, group: int, rcvbuf: int = 0, timeout_cs: int = 5, qthresh: int = 64) -> None:
        self.group = group
        self.nl = NetfilterSocket(rcvbuf)
        config = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                # Needed before 3.17 to make nfnetlink_log the family's logger; later kernels ignore it.
                self._try(config, family, 0, attribute(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_PF_BIND)))
            self.nl.request(
                config, socket.AF_UNSPEC, group, attribute(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND))
            )
            self.nl.request(
                config,
                socket.AF_UNSPEC,
                group,
                attribute(NFULA_CFG_MODE, struct.pack("!IBx", COPY_RANGE, NFULNL_COPY_PACKET))
                + attribute(NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ))
                # Flush a batch after timeout_cs hundredths of a second or qthresh packets: latency vs syscalls.
                + attribute(NFULA_CFG_TIMEOUT, struct.pack("!I", timeout_cs))
                + attribute(NFULA_CFG_QTHRESH, struct.pack("!I", qthresh)),
            )
        except BaseException:
            self.nl.close()
            raise

    def _try(self, msg_type: int, family: int, res_id: int, attrs: bytes) -> None:
        try:
            self.nl.request(msg_type, family, res_id, attrs)
        except NetlinkError:
            pass

    @staticmethod
    def packet(msg: Message) -> LoggedPacket | None:
        if msg.type != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            return None
        return LoggedPacket(
            be32(msg.attrs, NFULA_SEQ),
            msg.attrs.get(NFULA_PAYLOAD, b""),
            be32(msg.attrs, NFULA_UID),
            be32(msg.attrs, NFULA_GID),
            msg.attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0],
        )

    def close(self) -> None:
        self.nl.close()  # the kernel unbinds the group when the socket goes (NETLINK_URELEASE)


@dataclass(frozen=True)
class QueuedPacket:
    packet_id: int
    payload: bytes
    uid: int | None
    gid: int | None


class NfQueue:
    """Bound to one NFQUEUE queue, configured to fail open; every packet is accepted in batches."""

    def __init__(self, queue: int, rcvbuf: int = 0, maxlen: int = 256) -> None:
        self.queue = queue
        self.nl = NetfilterSocket(rcvbuf)
        config = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
        flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_UID_GID
        try:
            self.nl.request(
                config, socket.AF_UNSPEC, queue, attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))
            )
            self.nl.request(
                config,
                socket.AF_UNSPEC,
                queue,
                attribute(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, NFQNL_COPY_PACKET))
                + attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
                + attribute(NFQA_CFG_FLAGS, struct.pack("!I", flags))
                + attribute(NFQA_CFG_MASK, struct.pack("!I", flags)),
            )
        except BaseException:
            self.nl.close()
            raise

    def accept_through(self, packet_id: int) -> None:
        """NF_ACCEPT for every queued packet with an id up to packet_id: one message per batch."""
        self.nl.send(
            (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH,
            socket.AF_UNSPEC,
            self.queue,
            attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)),
        )

    @staticmethod
    def last_packet_id(datagram: bytes) -> int | None:
        """The id of the last packet in a datagram, read without decoding the rest: the verdict waits on it."""
        last = None
        for msg_type, _flags, _seq, raw, start, end in parse_messages(datagram):
            if msg_type != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                continue
            first = start + _NFGENMSG.size  # the kernel writes NFQA_PACKET_HDR first
            if first + 8 <= end and _NLATTR.unpack_from(raw, first) == (11, NFQA_PACKET_HDR):
                last = struct.unpack_from("!I", raw, first + _NLATTR.size)[0]
                continue
            header = parse_attributes(raw, first, end).get(NFQA_PACKET_HDR)
            if header is not None and len(header) >= 4:
                last = struct.unpack_from("!I", header)[0]
        return last

    @staticmethod
    def packet(msg: Message) -> QueuedPacket | None:
        header = msg.attrs.get(NFQA_PACKET_HDR)
        if msg.type != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET or header is None or len(header) < 4:
            return None
        return QueuedPacket(
            struct.unpack_from("!I", header)[0],
            msg.attrs.get(NFQA_PAYLOAD, b""),
            be32(msg.attrs, NFQA_UID),
            be32(msg.attrs, NFQA_GID),
        )

    def close(self) -> None:
        self.nl.close()  # the kernel forgets the queue; rules with --queue-bypass then let packets through
