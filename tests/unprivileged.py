"""The tool as an unprivileged user (nobody), wherever the checkout lies. nobody cannot read
a checkout under /root (mode 700), nor one cloned with umask 077: it runs a copy of the
package and of the virtual environment, in a directory it can read. Only files are
copied: the code that runs is the checkout's."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all")


def _readable_by_all(top: Path) -> None:
    for directory, _dirs, files in os.walk(top):
        os.chmod(directory, 0o755)
        for name in files:
            path = Path(directory, name)
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, mode | 0o444 | (0o111 if mode & stat.S_IXUSR else 0))


@contextmanager
def nobody_cli() -> Iterator[list[str]]:
    """The argv that runs `egress-auditor` as nobody, from a copy nobody can read."""
    with copied_cli() as argv:
        yield [*AS_NOBODY, *argv]


@contextmanager
def copied_cli(parent: Path | None = None) -> Iterator[list[str]]:
    """The argv that runs `egress-auditor` from a copy readable by all, in a new directory under
    parent (the temp directory by default): also where a sandbox hides the checkout (/tmp, /root)."""
    base = Path(tempfile.mkdtemp(prefix="ea-copy-", dir=parent))
    try:
        src = base / "src"
        for part in ("egress_auditor", "bpf"):
            shutil.copytree(CHECKOUT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
        python = Path(sys.executable)
        if sys.prefix != sys.base_prefix:  # a virtual environment: its packages are copied too
            venv = base / "venv"
            shutil.copytree(sys.prefix, venv, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
            python = venv / python.relative_to(sys.prefix)
        _readable_by_all(base)
        yield ["env", "-C", "/", f"PYTHONPATH={src}", str(python), "-m", "egress_auditor"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
