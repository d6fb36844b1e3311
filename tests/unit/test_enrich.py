"""The enrichment pipeline: enrichers run in their order, a dropped connection goes no further,
and a trace run filters by the command first, then attributes, then names."""

from __future__ import annotations

import dataclasses
import io
import ipaddress

from egress_auditor.attribution.enrich import CommandFilter, DnsNaming, Enrichment, ProcessDetail
from egress_auditor.attribution.names import DnsNames
from egress_auditor.display.live import PlainLog
from egress_auditor.model import Attribution, Connection, Family, Process, Transport
from egress_auditor.trace import TraceRun

ADDRESS = ipaddress.ip_address("192.0.2.7")


def connection(**changes: object) -> Connection:
    base = Connection(
        time=1000.0, protocol=Transport.TCP, family=Family.IPV4, src=None, sport=None, dst=ADDRESS, dport=443,
        pid=41, uid=0, gid=0, comm="curl", input="test", process=Process(pid=41, name="curl", uid=0),
        cgroup_id=7,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class Recorder:
    """An enricher that notes when it ran and what it saw."""

    def __init__(self, name: str, seen: list[str], drop: bool = False) -> None:
        self.name, self.seen, self.drop = name, seen, drop

    def enrich(self, conn: Connection) -> Connection | None:
        self.seen.append(f"{self.name}:{conn.comm}")
        return None if self.drop else dataclasses.replace(conn, comm=f"{conn.comm}+{self.name}")


def test_enrichers_run_in_order_and_each_sees_what_the_one_before_gave() -> None:
    seen: list[str] = []
    pipeline = Enrichment([Recorder("a", seen), Recorder("b", seen), Recorder("c", seen)])
    enriched = pipeline.enrich(connection())
    assert seen == ["a:curl", "b:curl+a", "c:curl+a+b"]
    assert enriched is not None and enriched.comm == "curl+a+b+c"


def test_a_dropped_connection_goes_no_further() -> None:
    seen: list[str] = []
    pipeline = Enrichment([Recorder("a", seen), Recorder("filter", seen, drop=True), Recorder("c", seen)])
    assert pipeline.enrich(connection()) is None
    assert seen == ["a:curl", "filter:curl+a"]


def test_dns_naming_names_from_the_cache_and_keeps_a_name_already_given() -> None:
    names = DnsNames()
    wire = dns_answer("www.example.test", str(ADDRESS))
    names.learn(wire, pid=0, now=999.0)
    naming = DnsNaming(names)
    named = naming.enrich(connection())
    assert named is not None and named.hostname == "www.example.test"
    kept = naming.enrich(connection(hostname="given.test"))
    assert kept is not None and kept.hostname == "given.test"
    unknown = naming.enrich(connection(dst=ipaddress.ip_address("192.0.2.8")))
    assert unknown is not None and unknown.hostname is None


class Owns:
    def __init__(self, inside: set[int]) -> None:
        self.inside = inside

    def owns(self, cgroup_id: int, _cgroups: object) -> bool:
        return cgroup_id in self.inside


class Known:
    lineage = None

    def attribute(self, conn: Connection) -> Process:
        return dataclasses.replace(conn.process, exe="/usr/bin/curl", attribution=Attribution.PROC)


def test_a_trace_run_filters_by_the_command_then_attributes_then_names() -> None:
    run = TraceRun(inputs=[], outputs=[], display=PlainLog(io.StringIO()), attributor=Known())  # type: ignore[arg-type]
    assert [type(e) for e in run.enrichment.enrichers] == [ProcessDetail, DnsNaming]
    command_run = TraceRun(
        inputs=[],
        outputs=[],
        display=PlainLog(io.StringIO()),
        command=Owns({7}),
        attributor=Known(),  # type: ignore[arg-type]
    )
    assert [type(e) for e in command_run.enrichment.enrichers] == [CommandFilter, ProcessDetail, DnsNaming]
    command_run.names.learn(dns_answer("www.example.test", str(ADDRESS)), pid=0, now=999.0)
    enriched = command_run.enrichment.enrich(connection())
    assert enriched is not None
    assert enriched.process.exe == "/usr/bin/curl" and enriched.hostname == "www.example.test"
    assert command_run.enrichment.enrich(connection(cgroup_id=8, connections=3)) is None
    assert command_run.supervisor is not None and command_run.supervisor.filter.outside == 3


def dns_answer(name: str, address: str) -> bytes:
    import dns.message
    import dns.rrset

    query = dns.message.make_query(name, "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "A", address))
    return response.to_wire()
