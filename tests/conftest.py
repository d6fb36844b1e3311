from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import Link, Namespace, link, namespace
from unprivileged import nobody_cli as _nobody_cli

KERNEL_DIR = Path(__file__).resolve().parent / "kernel"

# Property tests check what is right, not how fast: a busy 2-core machine misses any per-example deadline.
settings.register_profile("egress-auditor", deadline=None)
settings.load_profile("egress-auditor")


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


@pytest.fixture(scope="session")
def nobody_cli() -> Iterator[list[str]]:
    """argv running egress-auditor as nobody, from a copy it can read wherever the checkout lies."""
    with _nobody_cli() as argv:
        yield argv


# tests/vm runs only inside a VM of a stock kernel (scripts/vm_test.py sets this).
collect_ignore = [] if os.environ.get("EGRESS_AUDITOR_VM_KERNEL") else ["vm"]
