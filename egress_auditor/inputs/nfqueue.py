"""The nfqueue input: new connections queued by netfilter (nfnetlink_queue).

An auditor, never a gate: only a connection's first packet is queued, the
reader thread accepts every packet as soon as it arrives (one batch verdict
per read), the queue fails open when full (NFQA_CFG_F_FAIL_OPEN), and the
rules use --queue-bypass (nft: `queue ... bypass`), so traffic goes on when
the auditor is slow, stopped, or killed with SIGKILL.
"""

from __future__ import annotations

import errno
from typing import Any

from egress_auditor.inputs.netfilter.netlink import NetfilterSocket, NetlinkError, NfQueue
from egress_auditor.inputs.netfilter.reader import (
    NetfilterInput,
    Received,
    can_admin_network,
    dns_option,
    rcvbuf_option,
    setup_option,
)
from egress_auditor.plugins import Option, Plugin, positive_int


def queue_number(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("a queue number from 0 to 65535")
    return number


class NfqueueInput(NetfilterInput):
    name = "nfqueue"
    kind = "nfqueue"

    def __init__(self, options: dict[str, Any]) -> None:
        self.queue: NfQueue | None = None
        super().__init__(options)

    @property
    def number(self) -> int:
        return int(self.options["queue"])

    def bind(self) -> NetfilterSocket:
        self.queue = NfQueue(self.number, rcvbuf=self.options["rcvbuf"], maxlen=self.options["maxlen"])
        return self.queue.nl

    def bind_problem(self, exc: NetlinkError) -> str:
        if exc.errno in (errno.EBUSY, errno.EPERM) and can_admin_network():  # EPERM: another socket owns it
            return f"NFQUEUE queue {self.number} is already bound by another program: choose another nfqueue:queue"
        return super().bind_problem(exc)

    def describe_socket(self, socket_: NetfilterSocket) -> str:
        return f"{super().describe_socket(socket_)}, fail-open, every packet accepted"

    def read(self, timeout_s: float) -> list[bytes]:
        assert self.queue is not None
        datagrams = self.queue.nl.receive_raw(timeout_s)
        last = None
        for datagram in datagrams:
            found = NfQueue.last_packet_id(datagram)
            last = found if found is not None else last
        if last is not None:
            self.queue.accept_through(last)  # before anything else is done with them
        return datagrams

    def decode(self, at: float, datagram: bytes) -> list[Received]:
        found = (NfQueue.packet(m) for m in NetfilterSocket.decode(datagram))
        return [Received(p.packet_id, p.payload, p.uid, p.gid, at) for p in found if p is not None]

    def manual_hint(self) -> str:
        return (
            "iptables -t mangle -A OUTPUT -p tcp --syn -m conntrack --ctstate NEW "
            f"-j NFQUEUE --queue-num {self.number} --queue-bypass"
        )

    def socket_overruns(self) -> int:
        return self.queue.nl.overruns if self.queue is not None else 0

    def release(self) -> None:
        if self.queue is not None:
            self.queue.close()


PLUGIN = Plugin(
    name="nfqueue",
    kind="input",
    description="New connections queued by netfilter to an NFQUEUE queue and accepted at once (fail-open, "
    "--queue-bypass): TCP SYN and UDP, IPv4 and IPv6, uid/gid from the kernel, the process matched through its socket.",
    factory=NfqueueInput,
    options=(
        Option("queue", "NFQUEUE queue to read (--queue-num / nft queue num)", "100", convert=queue_number,
               valid="a queue number from 0 to 65535"),
        setup_option("nfqueue"),
        rcvbuf_option("4194304"),
        Option("maxlen", "packets the kernel holds for the queue; when full they pass unseen (fail-open)", "256",
               convert=positive_int, valid="a positive whole number"),
        dns_option(),
    ),
    example="-i nfqueue -I nfqueue:setup:auto",
)  # fmt: skip

__all__ = ["PLUGIN", "NfqueueInput"]
