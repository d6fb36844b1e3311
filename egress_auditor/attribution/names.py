"""DNS names behind addresses, learned from the answers the host receives.

Answers are parsed with dnspython; names are hostile data (whoever runs a DNS
server writes them) and leave here only as text, escaped later per target.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from egress_auditor.model import IPAddress

# A connect right after an answer with TTL 0 must still get its name.
MIN_TTL_S = 10.0
MAX_CNAME_HOPS = 16


@dataclass(frozen=True)
class Answer:
    """One address learned from one answer: `name` was asked for and gave `address`."""

    name: str
    address: IPAddress
    ttl: float


def parse_answer(wire: bytes) -> list[Answer]:
    """Addresses in a DNS response, each with the name that was asked for.

    CNAME chains are followed from the question: `www.example.com` CNAME
    `edge.cdn.net` A 192.0.2.7 gives (www.example.com, 192.0.2.7).
    """
    try:
        message = dns.message.from_wire(wire, ignore_trailing=True, one_rr_per_rrset=False)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        raise ValueError("not a DNS message") from None
    if not message.flags & dns.flags.QR or message.rcode() != dns.rcode.NOERROR:
        return []
    if len(message.question) != 1:
        return []
    asked = message.question[0].name
    chain: dict[dns.name.Name, tuple[dns.name.Name, int]] = {}
    for rrset in message.answer:
        if rrset.rdtype == dns.rdatatype.CNAME:
            for rdata in rrset:
                chain[rrset.name] = (rdata.target, rrset.ttl)
    # Names that stand for `asked`, with the smallest TTL on the way there.
    reachable = {asked: None}
    ttl_to: dict[dns.name.Name, int | None] = {asked: None}
    current = asked
    for _ in range(MAX_CNAME_HOPS):
        if current not in chain:
            break
        target, ttl = chain[current]
        previous = ttl_to[current]
        ttl_to[target] = ttl if previous is None else min(previous, ttl)
        reachable[target] = None
        current = target
    answers = []
    text = asked.to_text(omit_final_dot=True)
    for rrset in message.answer:
        if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA) or rrset.name not in reachable:
            continue
        via = ttl_to.get(rrset.name)
        ttl = rrset.ttl if via is None else min(rrset.ttl, via)
        for rdata in rrset:
            answers.append(Answer(text, ipaddress.ip_address(rdata.address), float(ttl)))
    return answers


class DnsNames:
    """Address → name asked for, per process where known and host-wide; TTLs
    honoured (at least MIN_TTL_S) and the number of entries bounded."""

    def __init__(self, max_entries: int = 65536) -> None:
        self._entries: OrderedDict[tuple[int, IPAddress], tuple[str, float]] = OrderedDict()
        self._max = max_entries
        self.answers = 0  # DNS responses that gave at least one address
        self.unparsed = 0  # payloads on port 53 that were not DNS responses

    def learn(self, wire: bytes, pid: int, now: float) -> list[Answer]:
        try:
            answers = parse_answer(wire)
        except ValueError:
            self.unparsed += 1
            return []
        if answers:
            self.answers += 1
        for answer in answers:
            expires = now + max(answer.ttl, MIN_TTL_S)
            for owner in {0, pid}:  # 0: host-wide
                key = (owner, answer.address)
                self._entries[key] = (answer.name, expires)
                self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return answers

    def name_for(self, address: IPAddress, pid: int, now: float) -> str | None:
        """The name this process (else any process) asked for that gave `address`."""
        for owner in (pid, 0):
            entry = self._entries.get((owner, address))
            if entry is not None and entry[1] >= now:
                return entry[0]
        return None

    def __len__(self) -> int:
        return len(self._entries)
