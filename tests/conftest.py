from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import Link, Namespace, link, namespace

KERNEL_DIR = Path(__file__).resolve().parent / "kernel"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.kernel)
    # Kernel tests need root. Outside CI they skip without it; in CI
    # (CI=true, root) a skip would hide a broken product, so they fail instead.
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("kernel tests must run as root in CI")
    skip = pytest.mark.skip(reason="needs root")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def client_ns() -> Iterator[Namespace]:
    with namespace("cli") as ns:
        yield ns


@pytest.fixture
def server_ns() -> Iterator[Namespace]:
    with namespace("srv") as ns:
        yield ns


@pytest.fixture
def net(client_ns: Namespace, server_ns: Namespace) -> Link:
    """A client and a server namespace joined by a veth pair (IPv4 and IPv6)."""
    return link(client_ns, server_ns)

# tests/vm runs only inside a VM of a stock kernel (scripts/vm_test.py sets this).
collect_ignore = [] if os.environ.get("EGRESS_AUDITOR_VM_KERNEL") else ["vm"]
