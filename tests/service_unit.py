"""The systemd unit as the tests read it: its capabilities, as setpriv takes them."""

from __future__ import annotations

from pathlib import Path

UNIT = Path(__file__).resolve().parents[1] / "packaging" / "systemd" / "egress-auditor.service"


def unit_capabilities() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return line.partition("=")[2].split()
    raise AssertionError("the unit sets no CapabilityBoundingSet")


def as_root_service(capabilities: list[str]) -> list[str]:
    """A command prefix: root with this bounding set and no_new_privs, as systemd starts the unit."""
    bounding = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in capabilities)])
    return ["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--inh-caps=-all", "--"]
