"""egress-auditor: see what a host connects to, then allow exactly that."""

__version__ = "0.1.0"
