"""Fixtures shared by the kernel tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from netfilter_run import Auditor


@pytest.fixture
def auditors() -> Iterator[list[Auditor]]:
    started: list[Auditor] = []
    yield started
    for auditor in started:
        auditor.kill()
