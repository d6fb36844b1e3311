"""scripts/vm_test.py's choices that need no VM: which packages are a series' kernels, which is
newest, and when the stage says it cannot run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vm_test.py"
spec = importlib.util.spec_from_file_location("vm_test", SCRIPT)
assert spec is not None and spec.loader is not None
vm_test = importlib.util.module_from_spec(spec)
sys.modules["vm_test"] = vm_test
spec.loader.exec_module(vm_test)


@pytest.mark.parametrize(
    ("series", "package", "version"),
    [
        ("6.1", "linux-image-6.1.0-57-amd64", "6.1.0-57-amd64"),
        ("6.1", "linux-image-6.1.0-57-cloud-amd64", None),
        ("6.1", "linux-image-6.1.0-57-amd64-dbg", None),
        ("6.1", "linux-image-6.12.118+deb12-amd64", None),
        ("6.12", "linux-image-6.12.118+deb12-amd64", "6.12.118+deb12-amd64"),
        ("6.12", "linux-image-6.12.118+deb12-rt-amd64", None),
        ("6.12", "linux-image-6.12-amd64", None),
    ],
)
def test_series_take_debians_generic_kernels_only(series: str, package: str, version: str | None) -> None:
    found = vm_test.SERIES[series].match(package)
    assert (found.group(1) if found else None) == version


def test_newest_is_by_number_not_text() -> None:
    versions = ["6.12.99+deb12-amd64", "6.12.118+deb12-amd64", "6.12.100+deb12-amd64"]
    assert max(versions, key=vm_test.version_key) == "6.12.118+deb12-amd64"


def test_turned_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EGRESS_AUDITOR_VM", "off")
    monkeypatch.setattr(sys, "argv", ["vm_test.py"])
    assert vm_test.why_not() == "EGRESS_AUDITOR_VM=off"
    assert vm_test.main() == vm_test.CANNOT_RUN
