"""Port numbers to service names, as /etc/services (netbase) names them."""

from __future__ import annotations

import socket
from functools import lru_cache

from egress_auditor.model import Transport


@lru_cache(maxsize=4096)
def service_name(port: int, protocol: Transport = Transport.TCP) -> str | None:
    try:
        return socket.getservbyport(port, protocol.name.lower())
    except (OSError, OverflowError):
        return None


def port_label(port: int, protocol: Transport = Transport.TCP) -> str:
    """`443(https)`, or the bare number when the port has no name."""
    name = service_name(port, protocol)
    return f"{port}({name})" if name else str(port)
