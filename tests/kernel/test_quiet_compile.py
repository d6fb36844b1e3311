"""BCC's compiler warnings stay off the user's stderr unless --debug asks for them. Stock kernels'
headers cause such warnings (tests/vm checks the whole start on Debian's 6.12); here a program
with a warning of its own stands in for them, compiled for real by BCC in a child process, whose
stderr (file descriptor 2, where clang writes) is captured."""

from __future__ import annotations

import subprocess
import sys

import pytest

from egress_auditor import cli
from egress_auditor.errors import UsageError
from egress_auditor.host import compiler

# clang warns by default about a literal's implicit conversion: "changes value from 1.5 to 1".
COMPILE = (
    "import sys\n"
    "from bcc import BPF\n"
    "from egress_auditor.host.compiler import show_warnings, warning_flags\n"
    "show_warnings(sys.argv[1] == 'debug')\n"
    "BPF(text='int f(void *ctx) { int x = 1.5; return x; }', cflags=warning_flags())\n"
)


def compile_stderr(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", COMPILE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_warnings_hidden_by_default_and_shown_with_debug() -> None:
    assert compile_stderr("quiet") == ""
    assert "changes value from 1.5 to 1" in compile_stderr("debug")


def test_trace_debug_turns_warnings_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiler, "_show_warnings", False)
    with pytest.raises(UsageError):  # --debug lets the error through, after the option is taken
        cli.main(["trace", "--debug", "-i", "no-such-input"])
    assert compiler.warning_flags() == []
    monkeypatch.setattr(compiler, "_show_warnings", False)
    with pytest.raises(SystemExit):
        cli.main(["trace", "-i", "no-such-input"])
    assert compiler.warning_flags() == ["-w"]
