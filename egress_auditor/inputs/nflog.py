"""The nflog input: packet copies from an NFLOG group (nfnetlink_log).

A rule of your own works: add it, e.g.
`iptables -I OUTPUT -m state --state NEW -p tcp -j NFLOG --nflog-group 100`,
and run `egress-auditor trace -i nflog -I nflog:group:100`. With
`-I nflog:setup:auto` the input installs (and removes) rules of its own.
The kernel numbers each message of the group (NFULNL_CFG_F_SEQ): gaps are
messages it could not deliver, counted as lost.
"""

from __future__ import annotations

import errno
from typing import Any

from egress_auditor.inputs.netfilter.netlink import NetfilterSocket, NetlinkError, NflogGroup
from egress_auditor.inputs.netfilter.reader import (
    NetfilterInput,
    Received,
    can_admin_network,
    dns_option,
    rcvbuf_option,
    setup_option,
)
from egress_auditor.plugins import Option, Plugin


def group_number(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("a group number from 0 to 65535")
    return number


class NflogInput(NetfilterInput):
    name = "nflog"
    kind = "nflog"

    def __init__(self, options: dict[str, Any]) -> None:
        self.group: NflogGroup | None = None
        super().__init__(options)

    @property
    def number(self) -> int:
        return int(self.options["group"])

    def bind(self) -> NetfilterSocket:
        self.group = NflogGroup(self.number, rcvbuf=self.options["rcvbuf"])
        return self.group.nl

    def bind_problem(self, exc: NetlinkError) -> str:
        if exc.errno in (errno.EBUSY, errno.EPERM) and can_admin_network():  # EPERM: another socket owns it
            return f"NFLOG group {self.number} is already bound by another program (ulogd?): choose another nflog:group"
        return super().bind_problem(exc)

    def read(self, timeout_s: float) -> list[bytes]:
        assert self.group is not None
        return self.group.nl.receive_raw(timeout_s)

    def decode(self, at: float, datagram: bytes) -> list[Received]:
        found = (NflogGroup.packet(m) for m in NetfilterSocket.decode(datagram))
        return [Received(p.seq, p.payload, p.uid, p.gid, at) for p in found if p is not None]

    def manual_hint(self) -> str:
        return f"iptables -I OUTPUT -m state --state NEW -p tcp -j NFLOG --nflog-group {self.number}"

    def socket_overruns(self) -> int:
        return self.group.nl.overruns if self.group is not None else 0

    def release(self) -> None:
        if self.group is not None:
            self.group.close()


PLUGIN = Plugin(
    name="nflog",
    kind="input",
    description="New connections logged by netfilter to an NFLOG group (where BPF is not allowed): "
    "TCP SYN and UDP, IPv4 and IPv6, uid/gid from the kernel, the process matched through its socket.",
    factory=NflogInput,
    options=(
        Option("group", "NFLOG group to read (--nflog-group / nft log group)", "100", convert=group_number,
               valid="a group number from 0 to 65535"),
        setup_option("nflog"),
        rcvbuf_option("4194304"),
        dns_option(),
    ),
    example="-i nflog -I nflog:group:100 -I nflog:setup:auto",
)  # fmt: skip

__all__ = ["PLUGIN", "NflogInput"]
