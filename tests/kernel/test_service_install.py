"""scripts/install-service.sh, run for real under a scratch root (--root): a
working tool in its own virtual environment (pip installs this checkout and
its dependencies), the unit and the options file; a second run keeps the
operator's edited options. Nothing is installed on the test host itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install-service.sh"
FIND_BPF = "from egress_auditor.inputs import ebpf; print(ebpf.bpf_source_dir())"


def install(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "--root", str(root)], capture_output=True, text=True, timeout=600)


def test_install_service_under_a_root_gives_a_working_tool_unit_and_options(tmp_path: Path) -> None:
    first = install(tmp_path)
    assert first.returncode == 0, first.stderr
    tool = tmp_path / "opt/egress-auditor/bin/egress-auditor"
    version = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("egress-auditor "), version
    # The BPF sources travel with the package: the service has no checkout to read them from.
    found = subprocess.run(
        [str(tmp_path / "opt/egress-auditor/bin/python"), "-c", FIND_BPF],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not the checkout, whose package would be imported instead
    )
    assert found.returncode == 0, found.stderr
    assert str(tmp_path) in found.stdout and (Path(found.stdout.strip()) / "events.h").is_file(), found.stdout
    unit = tmp_path / "etc/systemd/system/egress-auditor.service"
    options = tmp_path / "etc/default/egress-auditor"
    assert unit.read_text() == (REPO / "packaging/systemd/egress-auditor.service").read_text()
    assert options.read_text() == (REPO / "packaging/systemd/egress-auditor.env").read_text()
    assert "nothing was enabled" in first.stderr

    options.write_text('EGRESS_AUDITOR_OPTIONS="-o nftables"\n')
    again = install(tmp_path)
    assert again.returncode == 0, again.stderr
    assert options.read_text() == 'EGRESS_AUDITOR_OPTIONS="-o nftables"\n'
    assert "keeping" in again.stderr


def test_install_service_refuses_an_unknown_option(tmp_path: Path) -> None:
    result = subprocess.run([str(SCRIPT), "--prefix", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "install-service: unknown option --prefix (try --help)"
    assert not any(tmp_path.iterdir())
