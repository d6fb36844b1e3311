"""The suite's checks as nobody pass from a checkout nobody cannot read: a copy of
this checkout and its virtual environment under a mode-700 directory, as a clone
in root's home is, runs them with its own interpreter."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from unprivileged import AS_NOBODY, CHECKOUT

CHECKS_AS_NOBODY = (
    "tests/unit/test_options.py",
    "tests/kernel/test_trace_e2e.py",
    "-k",
    "doctor_failure or unprivileged",
)


def test_checks_as_nobody_pass_from_a_checkout_nobody_cannot_read() -> None:
    home = Path(tempfile.mkdtemp(prefix="ea-home-"))  # mode 700, as /root
    try:
        project = home / "project"
        skip = shutil.ignore_patterns("__pycache__", ".pytest_cache")
        for part in ("egress_auditor", "bpf", "tests"):
            shutil.copytree(CHECKOUT / part, project / part, ignore=skip)
        shutil.copy2(CHECKOUT / "pyproject.toml", project)
        assert sys.prefix != sys.base_prefix, "run the suite from its virtual environment"
        shutil.copytree(sys.prefix, project / ".venv", symlinks=True, ignore=skip)
        python = project / ".venv" / Path(sys.executable).relative_to(sys.prefix)
        unreadable = subprocess.run([*AS_NOBODY, "test", "-r", str(project / "pyproject.toml")], check=False)
        assert unreadable.returncode != 0, "nobody can read the copy: this test would test nothing"
        result = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CHECKS_AS_NOBODY],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 passed" in result.stdout and "skipped" not in result.stdout, result.stdout
    finally:
        shutil.rmtree(home, ignore_errors=True)
