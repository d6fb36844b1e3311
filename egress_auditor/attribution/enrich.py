"""Enrichment: what a trace run adds to each connection an input hands over,
before the flow table and the outputs see it. Enrichers run in order; one
may drop a connection (the audited command's filter), the others fill in
detail: the process behind it, then the DNS name that led to its destination.

Inputs only translate what the kernel reports; whatever needs knowledge
gathered across connections (lineage, /proc, cgroups, DNS answers) is applied here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from egress_auditor.attribution.names import DnsNames
from egress_auditor.attribution.process import Attributor, CgroupLookup
from egress_auditor.attribution.redact import redact_process
from egress_auditor.command import AuditedCommand
from egress_auditor.model import Connection


class Enricher(Protocol):
    name: str  # what it adds, in the user's words

    def enrich(self, conn: Connection) -> Connection | None:
        """The connection with what this enricher knows added; None: not recorded at all."""
        ...


class CommandFilter:
    """`trace -- CMD`: only connections from the command's cgroup and below are recorded."""

    name = "the command's connections"

    def __init__(self, command: AuditedCommand, cgroups: CgroupLookup) -> None:
        self.command = command
        self.cgroups = cgroups
        self.outside = 0  # connections from outside the command's cgroup, repeats included

    def enrich(self, conn: Connection) -> Connection | None:
        if self.command.owns(conn.cgroup_id, self.cgroups):
            return conn
        self.outside += conn.connections
        return None


class ProcessDetail:
    """Who made the connection (process.py: the kernel lineage, else /proc, else the kernel's name),
    its cgroup and service; command lines lose their secrets here, before any output sees them."""

    name = "process"

    def __init__(self, attributor: Attributor, redact: bool = True) -> None:
        self.attributor = attributor
        self.redact = redact

    def enrich(self, conn: Connection) -> Connection | None:
        process = self.attributor.attribute(conn)
        return dataclasses.replace(conn, process=redact_process(process) if self.redact else process)


class DnsNaming:
    """The name the process (else any process) asked for that gave the destination, from the DNS
    answers the inputs learned (`DnsNames`). Named after every input's poll: an answer and the
    connect it led to may reach user space in either order within one poll."""

    name = "DNS names"

    def __init__(self, names: DnsNames) -> None:
        self.names = names

    def enrich(self, conn: Connection) -> Connection | None:
        if conn.hostname:
            return conn
        name = self.names.name_for(conn.dst, conn.pid, conn.time)
        return dataclasses.replace(conn, hostname=name) if name else conn


class Enrichment:
    """The enrichers in order: a connection one of them drops goes no further."""

    def __init__(self, enrichers: Sequence[Enricher]) -> None:
        self.enrichers = tuple(enrichers)

    def enrich(self, conn: Connection) -> Connection | None:
        for enricher in self.enrichers:
            enriched = enricher.enrich(conn)
            if enriched is None:
                return None
            conn = enriched
        return conn
