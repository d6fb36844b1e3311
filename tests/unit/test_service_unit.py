"""The systemd unit in packaging/systemd: `systemd-analyze verify` accepts it
without a word (it needs no running systemd), and its settings are the ones
docs/service.md promises."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "systemd"
UNIT = PACKAGING / "egress-auditor.service"
ENV = PACKAGING / "egress-auditor.env"
INSTALLED_TOOL = "/opt/egress-auditor/bin/egress-auditor"
STATE = "/var/lib/egress-auditor"


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given, across sections (the unit repeats no key across sections)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify on a copy whose ExecStart names this checkout's tool: verify checks
    that the program exists, and /opt/egress-auditor is there only once the service is installed."""
    tool = Path(sys.executable).with_name("egress-auditor")
    copy = tmp_path / UNIT.name
    copy.write_text(unit_text.replace(INSTALLED_TOOL, str(tool)))
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )


def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert INSTALLED_TOOL in text
    result = verify(text, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_verify_as_run_here_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: verify exits 0 on an unknown key, but says so."""
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes")
    result = verify(broken, tmp_path)
    assert "Unknown key" in result.stderr and "ProtectHomes" in result.stderr


def test_the_unit_runs_the_trace_indefinitely_with_its_options_from_the_environment_file() -> None:
    settings = unit_settings(UNIT.read_text())
    (exec_start,) = settings["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[:3] == [INSTALLED_TOOL, "trace", "--no-live"]
    assert not {"--duration", "-t", "--count", "-C"} & set(argv)  # runs until stopped
    assert argv[3:] == ["$EGRESS_AUDITOR_OPTIONS"]  # unbraced: systemd splits it into words
    assert settings["EnvironmentFile"] == ["/etc/default/egress-auditor"]
    assert settings["Restart"] == ["on-failure"]
    # Restarts stop on a host that cannot run it: more tries in the interval than RestartSec allows.
    (interval,), (burst,), (pause,) = (
        settings["StartLimitIntervalSec"],
        settings["StartLimitBurst"],
        settings["RestartSec"],
    )
    assert int(burst) * int(pause) < int(interval)
    assert settings["StateDirectory"] == ["egress-auditor"]
    assert settings["WantedBy"] == ["multi-user.target"]


def test_the_unit_is_hardened_and_writes_its_state_alone() -> None:
    settings = unit_settings(UNIT.read_text())
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": STATE,
        "AmbientCapabilities": "",
    }.items():
        assert settings[key] == [value], key
    (bounding,) = settings["CapabilityBoundingSet"]
    assert "CAP_SYS_ADMIN" not in bounding.split()


def test_the_environment_file_keeps_every_file_under_the_state_directory() -> None:
    values = unit_settings(ENV.read_text())
    (options,) = values["EGRESS_AUDITOR_OPTIONS"]
    words = shlex.split(options)[0].split()  # the file quotes the value; systemd splits it on spaces
    paths = [w.split(":", 2)[2] for w in words if w.startswith(("json:file:", "nftables:file:", "iptables:dir:"))]
    resumed = [words[i + 1] for i, w in enumerate(words) if w == "--resume"]
    assert len(paths) == 3 and resumed == [f"{STATE}/capture.jsonl"]
    assert all(p.startswith(STATE + "/") for p in [*paths, *resumed]), paths
    assert f"json:file:{STATE}/capture.jsonl" in words  # appends to the capture it resumes from
    assert "--no-live" not in words  # the unit gives it
