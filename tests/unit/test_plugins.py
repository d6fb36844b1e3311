"""The plugin contract: versioned entry-point groups, every registered plugin
providing the whole Input or Output protocol (optional methods from the base
classes), and a plugin that cannot be loaded skipped with one line.

Broken plugins are real installed distributions: a dist-info folder in a
temporary directory put on sys.path, found by importlib.metadata as pip's
would be."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from egress_auditor.display.live import Display, LiveTable, PlainLog
from egress_auditor.errors import AuditorError
from egress_auditor.inputs import Input, InputBase, InputStats
from egress_auditor.model import Summary
from egress_auditor.outputs import Output, OutputBase
from egress_auditor.plugins import GROUPS, Plugin, contract_methods, registered, select
from egress_auditor.trace import TraceRun

BUILT_IN = {"input": {"ebpf", "nflog", "nfqueue"}, "output": {"iptables", "nftables", "json", "loki"}}


def install_broken(root: Path) -> None:
    """A distribution whose entry points fail each in its own way."""
    (root / "explodes_on_import.py").write_text("raise RuntimeError('cannot start\\nsecond line')\n")
    (root / "not_a_plugin.py").write_text("PLUGIN = 'a string'\n")
    info = root / "broken_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[{GROUPS['input']}]\n"
        "explodes = explodes_on_import:PLUGIN\n"
        f"[{GROUPS['output']}]\n"
        "missing = no_such_module_for_egress_auditor:PLUGIN\n"
        "wrong = not_a_plugin:PLUGIN\n"
        # An old, unversioned group is not read: its contract may differ.
        "[egress_auditor.outputs]\n"
        "unversioned = not_a_plugin:PLUGIN\n"
    )


def test_groups_carry_a_version() -> None:
    assert GROUPS == {"input": "egress_auditor.inputs.v1", "output": "egress_auditor.outputs.v1"}
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    for group in GROUPS.values():
        assert f'[project.entry-points."{group}"]' in pyproject


@pytest.mark.parametrize(("kind", "protocol"), [("input", Input), ("output", Output)])
def test_every_registered_plugin_provides_the_whole_contract(kind: str, protocol: type) -> None:
    plugins = registered(kind)
    assert set(plugins) == BUILT_IN[kind]
    for plugin in plugins.values():
        factory = plugin.factory
        assert isinstance(factory, type), plugin.name
        missing = {m for m in contract_methods(protocol) if not callable(getattr(factory, m, None))}
        assert not missing, f"{kind} {plugin.name} lacks {missing}"
        assert factory.name == plugin.name  # type: ignore[attr-defined]


@pytest.mark.parametrize("display", [PlainLog, LiveTable])
def test_displays_provide_the_whole_contract(display: type) -> None:
    assert all(callable(getattr(display, name, None)) for name in contract_methods(Display))
    assert isinstance(display.name, str) and display.name  # type: ignore[attr-defined]


def test_base_classes_give_every_optional_method_a_default() -> None:
    assert contract_methods(InputBase) == {"sync", "restrict_to_cgroup", "learn_names"} <= contract_methods(Input)
    assert contract_methods(OutputBase) == {"connection", "reopen", "drift", "snapshot"} <= contract_methods(Output)


def test_a_broken_plugin_is_reported_in_one_line_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_broken(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for kind, broken in (("input", ["explodes"]), ("output", ["missing", "wrong"])):
        stderr = io.StringIO()
        assert set(registered(kind, stderr=stderr)) == BUILT_IN[kind]
        lines = stderr.getvalue().splitlines()
        assert len(lines) == len(broken), lines
        for name, line in zip(sorted(broken), sorted(lines), strict=True):
            assert line.startswith(f"egress-auditor: {kind} plugin {name} skipped: "), line
    stderr = io.StringIO()
    registered("input", stderr=stderr)
    assert "RuntimeError: cannot start\\x0asecond line" in stderr.getvalue()


def test_the_cli_lists_the_others_when_a_plugin_is_broken(tmp_path: Path) -> None:
    install_broken(tmp_path)
    script = Path(sys.executable).parent / "egress-auditor"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([str(script), "list"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 3, done.stderr
    for name in (*BUILT_IN["input"], *BUILT_IN["output"]):
        assert f"  {name}:" in done.stdout


class FinalOnly(OutputBase):
    """An output that writes only at the end, as the firewall outputs do."""

    name = "final-only"

    def finish(self, flows: list, summary: Summary) -> str:
        return f"{len(flows)} flows\n"


class NoEvents(InputBase):
    name = "quiet"

    def open(self) -> str:
        return "nothing"

    def poll(self, timeout_s: float, emit: object) -> None:
        pass

    def stats(self) -> InputStats:
        return InputStats()

    def close(self) -> None:
        pass


def test_a_run_uses_the_defaults_of_an_output_without_optional_contract_methods() -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    run = TraceRun(
        inputs=[NoEvents()],
        outputs=[FinalOnly()],
        display=PlainLog(io.StringIO()),
        count=0,
        stdout=stdout,
        stderr=stderr,
    )
    run._reopen_outputs()  # SIGHUP: the base class's reopen, not a failure
    assert run.run() == 0
    assert stdout.getvalue() == "0 flows\n"
    assert "failed" not in stderr.getvalue(), stderr.getvalue()


class WithoutReopen:
    """An output written for another contract: no reopen()."""

    name = "old-style"

    def __init__(self, options: dict) -> None:
        pass

    def connection(self, conn: object, flow: object, is_new: bool) -> None:
        pass

    def finish(self, flows: list, summary: Summary) -> str:
        return ""


def test_a_plugin_lacking_part_of_the_contract_is_refused_in_one_line() -> None:
    old = Plugin(name="old-style", kind="output", description="no reopen", factory=WithoutReopen)
    available = {**registered("output"), "old-style": old}
    with pytest.raises(AuditorError) as refused:
        select("output", ["iptables", "old-style"], [], default="iptables", available=available).create()
    message = str(refused.value)
    wanted = f"output plugin old-style lacks drift, reopen, snapshot: it was not written for {GROUPS['output']}"
    assert message == wanted
    assert refused.value.exit_status == 1
    # With the base class's defaults the same output is accepted.
    fixed = Plugin(name="fixed", kind="output", description="", factory=type("Fixed", (OutputBase, WithoutReopen), {}))
    created = select("output", ["fixed"], [], default="fixed", available={"fixed": fixed}).create()
    assert len(created) == 1 and isinstance(created[0], OutputBase)
