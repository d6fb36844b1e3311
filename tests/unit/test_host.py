"""host.py's parsing of what the kernel prints."""

from __future__ import annotations

import pytest

from egress_auditor.host import online_cpus, parse_cpu_list


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0\n", [0]), ("0-3\n", [0, 1, 2, 3]), ("0-1,4,6-7\n", [0, 1, 4, 6, 7]), ("", [])],
)
def test_cpu_lists_as_the_kernel_writes_them(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


def test_a_malformed_cpu_list_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_cpu_list("0-a")


def test_this_machine_has_its_cpus_online() -> None:
    assert online_cpus()[0] == 0 and len(online_cpus()) >= 1
