"""DNS answers to names: CNAME chains, TTLs, the bound, per-process names, and
whatever a hostile server sends."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_auditor.attribution.names import MIN_TTL_S, DnsNames, parse_answer


def answer(name: str, *records: tuple[str, int, str, str]) -> bytes:
    response = dns.message.make_response(dns.message.make_query(name, "A"))
    for owner, ttl, rdtype, value in records:
        response.answer.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, value))
    return response.to_wire()


def test_a_cname_chain_gives_the_name_asked_for_with_the_smallest_ttl() -> None:
    wire = answer(
        "www.example.test",
        ("www.example.test.", 300, "CNAME", "edge.cdn.test."),
        ("edge.cdn.test.", 120, "CNAME", "pop1.cdn.test."),
        ("pop1.cdn.test.", 600, "A", "192.0.2.7"),
        ("unrelated.test.", 600, "A", "192.0.2.99"),  # not on the chain: not named
    )
    found = parse_answer(wire)
    assert [(a.name, str(a.address), a.ttl) for a in found] == [("www.example.test", "192.0.2.7", 120.0)]


def test_queries_errors_and_garbage_give_no_names() -> None:
    query = dns.message.make_query("x.test", "A").to_wire()
    assert parse_answer(query) == []  # QR bit clear: a question, not an answer
    refused = dns.message.make_response(dns.message.make_query("x.test", "A"))
    refused.set_rcode(dns.rcode.NXDOMAIN)
    assert parse_answer(refused.to_wire()) == []
    with pytest.raises(ValueError):
        parse_answer(b"\x00\x01garbage")


def test_ttls_are_honoured_with_a_floor() -> None:
    names = DnsNames()
    names.learn(answer("short.test", ("short.test.", 0, "A", "192.0.2.1")), pid=10, now=1000.0)
    address = ipaddress.ip_address("192.0.2.1")
    assert names.name_for(address, 10, 1000.0 + MIN_TTL_S) == "short.test"
    assert names.name_for(address, 10, 1000.0 + MIN_TTL_S + 1) is None
    names.learn(answer("long.test", ("long.test.", 3600, "A", "192.0.2.2")), pid=10, now=1000.0)
    assert names.name_for(ipaddress.ip_address("192.0.2.2"), 10, 4599.0) == "long.test"
    assert names.name_for(ipaddress.ip_address("192.0.2.2"), 10, 4601.0) is None


def test_a_process_keeps_its_own_name_for_a_shared_address() -> None:
    names = DnsNames()
    names.learn(answer("one.test", ("one.test.", 60, "A", "192.0.2.5")), pid=1, now=0.0)
    names.learn(answer("two.test", ("two.test.", 60, "A", "192.0.2.5")), pid=2, now=0.0)
    address = ipaddress.ip_address("192.0.2.5")
    assert names.name_for(address, 1, 1.0) == "one.test"
    assert names.name_for(address, 2, 1.0) == "two.test"
    assert names.name_for(address, 3, 1.0) == "two.test", "others get the latest host-wide answer"


def test_the_cache_is_bounded_oldest_first() -> None:
    names = DnsNames(max_entries=10)
    for i in range(50):
        names.learn(answer(f"n{i}.test", (f"n{i}.test.", 60, "A", f"192.0.2.{i}")), pid=0, now=0.0)
    assert len(names) == 10
    assert names.name_for(ipaddress.ip_address("192.0.2.49"), 0, 1.0) == "n49.test"
    assert names.name_for(ipaddress.ip_address("192.0.2.0"), 0, 1.0) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_anything_but_not_dns(wire: bytes) -> None:
    names = DnsNames()
    names.learn(wire, pid=1, now=0.0)  # counted as unparsed or learned, never an exception
    assert names.unparsed + names.answers <= 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=3))
def test_any_label_bytes_come_back_as_one_line_of_text(labels: list[bytes]) -> None:
    name = dns.name.Name([*labels, b"test", b""])
    response = dns.message.make_response(dns.message.make_query(name, "A"))
    response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.1"))
    response.flags |= dns.flags.AA
    found = parse_answer(response.to_wire())
    assert len(found) == 1
    # dnspython escapes non-printable bytes as \DDD: the name is printable ASCII.
    assert all(" " < ch <= "~" for ch in found[0].name)
