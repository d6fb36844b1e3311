"""Command-line options: durations, the flag-only form, plugin options,
and what the installed console script does with bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

import egress_auditor
from egress_auditor.cli import app, normalise_argv, parse_duration
from egress_auditor.errors import UsageError
from egress_auditor.inputs.ebpf import PLUGIN as EBPF_PLUGIN
from egress_auditor.model import Flow, Summary
from egress_auditor.outputs import OutputBase
from egress_auditor.plugins import Option, Plugin, registered, select

# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60", 60.0), ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("1.5", 1.5), (" 2m ", 120.0), ("0.5h", 1800.0)],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["0", "0s", "0.0m", "-1", "-5m", "abc", "5x", "", "m", "5 m s", "1e3", "inf"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert repr(text) in message
    # The message shows every accepted form, so the user can fix the input from it alone.
    for form in ("60", "90s", "5m", "1h"):
        assert form in message


# ---------------------------------------------------------------- the flag-only form

GO_FORM = ["-i", "ebpf", "-o", "iptables", "-O", "iptables:verbose:2"]


def test_go_form_becomes_trace() -> None:
    assert normalise_argv(GO_FORM) == ["trace", *GO_FORM]


def test_go_form_parses_as_trace_options() -> None:
    # Parse with the real click command tree: the normalised argv must mean the same as `trace ...`.
    argv = normalise_argv(GO_FORM)
    command = typer.main.get_command(app)
    ctx = command.commands[argv[0]].make_context(argv[0], argv[1:])  # type: ignore[attr-defined]
    assert ctx.params["inputs"] == ["ebpf"]
    assert ctx.params["outputs"] == ["iptables"]
    assert ctx.params["output_options"] == ["iptables:verbose:2"]
    chosen = select("output", ctx.params["outputs"], ctx.params["output_options"], default="iptables").chosen
    assert chosen["iptables"]["verbose"] == 2


@pytest.mark.parametrize("flag", ["-l", "--list", "--version", "-h", "--help"])
def test_go_form_passthrough(flag: str) -> None:
    assert normalise_argv([flag]) == [flag]


@pytest.mark.parametrize("argv", [[], ["trace", "-t", "5"], ["list"], ["doctor"], ["trace", "-i", "ebpf"]])
def test_subcommands_unchanged(argv: list[str]) -> None:
    assert normalise_argv(list(argv)) == argv


# ---------------------------------------------------------------- plugin options


def _usage_error(kind: str, names: list[str], options: list[str], **kwargs: Any) -> str:
    default = "ebpf" if kind == "input" else "iptables"
    with pytest.raises(UsageError) as caught:
        select(kind, names, options, default=default, **kwargs)
    return str(caught.value)


def test_defaults_are_parsed() -> None:
    for kind in ("input", "output"):
        for plugin in registered(kind).values():
            chosen = select(kind, [plugin.name], [], default=plugin.name).chosen[plugin.name]
            assert set(chosen) == {o.key for o in plugin.options}
    assert select("output", [], [], default="iptables").chosen["iptables"]["verbose"] == 0


def test_options_override_defaults_and_names_dedupe() -> None:
    sel = select(
        "output",
        ["iptables", "iptables"],
        ["iptables:verbose:1", "iptables:policy:drop", "iptables:verbose:2"],
        default="iptables",
    )
    assert list(sel.chosen) == ["iptables"]
    assert sel.chosen["iptables"]["verbose"] == 2  # the last -O for a key wins
    assert sel.chosen["iptables"]["policy"] == "drop"


def test_value_may_hold_colons() -> None:
    sel = select("output", [], ["iptables:dir:/srv/a:b"], default="iptables")
    assert sel.chosen["iptables"]["dir"] == "/srv/a:b"


@pytest.mark.parametrize("kind", ["input", "output"])
def test_unknown_plugin_names_valid_ones(kind: str) -> None:
    message = _usage_error(kind, ["nope"], [])
    assert "'nope'" in message
    assert f"valid: {', '.join(registered(kind))}" in message


@pytest.mark.parametrize("kind", ["input", "output"])
def test_unknown_plugin_in_option_names_valid_ones(kind: str) -> None:
    message = _usage_error(kind, [], ["nope:key:value"])
    assert "'nope'" in message
    assert f"valid: {', '.join(registered(kind))}" in message


@pytest.mark.parametrize("kind", ["input", "output"])
def test_unknown_key_names_valid_keys(kind: str) -> None:
    for plugin in registered(kind).values():
        message = _usage_error(kind, [plugin.name], [f"{plugin.name}:nope:1"])
        assert "'nope'" in message
        assert f"valid: {', '.join(o.key for o in plugin.options)}" in message


@pytest.mark.parametrize("text", ["iptables:verbose", ":x:y", "iptables::1", "bad", "", ":", "::"])
def test_malformed_option(text: str) -> None:
    message = _usage_error("output", [], [text])
    assert repr(text) in message
    assert "plugin:key:value" in message
    assert "-O" in message


def test_malformed_input_option_names_input_flag() -> None:
    message = _usage_error("input", [], ["ebpf:probe"])
    assert "-I" in message
    assert "plugin:key:value" in message


@pytest.mark.parametrize(
    ("kind", "option", "expected"),
    [
        ("output", "iptables:verbose:9", "valid: 0, 1, 2"),
        ("output", "iptables:format:json", "valid: commands, restore"),
        ("output", "iptables:policy:reject", "valid: accept, drop"),
        ("input", "ebpf:probe:uprobe", "valid: auto, fentry, kprobe, cgroup, tracepoint"),
        ("input", "ebpf:pages:3", "a power of two"),
        ("input", "ebpf:pages:0", "a power of two"),
        ("input", "ebpf:max_flows:0", "a whole number from 1 to 16777216"),
        ("input", "ebpf:max_flows:abc", "a whole number from 1 to 16777216"),
        ("input", "ebpf:max_flows:16777217", "a whole number from 1 to 16777216"),
        ("input", "ebpf:count_lines:3", "auto, off or a power of two up to 16777216"),
        ("input", "ebpf:count_lines:0", "auto, off or a power of two"),
        ("input", "ebpf:count_lines:on", "auto, off or a power of two"),
        ("input", "ebpf:count_lines:33554432", "auto, off or a power of two up to 16777216"),
    ],
)
def test_invalid_value_names_what_is_valid(kind: str, option: str, expected: str) -> None:
    message = _usage_error(kind, [], [option])
    value = option.split(":", 2)[2]
    assert f"invalid value {value!r}" in message
    assert expected in message


def test_every_choice_is_accepted() -> None:
    # The converse of the invalid-value tests: nothing listed as valid is refused.
    for kind in ("input", "output"):
        for plugin in registered(kind).values():
            for option in plugin.options:
                for choice in option.choices:
                    sel = select(kind, [plugin.name], [f"{plugin.name}:{option.key}:{choice}"], default=plugin.name)
                    assert sel.chosen[plugin.name][option.key] == option.parse(plugin.name, choice)


class JsonlOutput(OutputBase):
    name = "jsonl"

    def __init__(self, options: dict[str, str]) -> None:
        self.options = options

    def finish(self, flows: list[Flow], summary: Summary) -> str:
        return ""


def test_option_for_unselected_plugin() -> None:
    # A second output declared the way a third-party package would, so one can be left unselected.
    extra = Plugin(
        name="jsonl",
        kind="output",
        description="one JSON object per flow",
        factory=JsonlOutput,
        options=(Option("pretty", "indent the output", "0", ("0", "1")),),
    )
    available = {**registered("output"), "jsonl": extra}
    message = _usage_error("output", ["iptables"], ["jsonl:pretty:1"], available=available)
    assert "not selected" in message
    assert "-o jsonl" in message
    # Selected, the same option is accepted.
    sel = select("output", ["iptables", "jsonl"], ["jsonl:pretty:1"], default="iptables", available=available)
    assert sel.chosen["jsonl"] == {"pretty": "1"}
    assert sel.create()[1].options == {"pretty": "1"}


def test_input_option_for_unselected_default() -> None:
    # -I for the default input while another one is chosen explicitly.
    extra = Plugin(name="pcap", kind="input", description="packets", factory=lambda options: options)
    available = {**registered("input"), "pcap": extra}
    message = _usage_error("input", ["pcap"], ["ebpf:probe:kprobe"], available=available)
    assert "not selected" in message
    assert "-i ebpf" in message


# ---------------------------------------------------------------- the console script


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "egress-auditor"
    return [str(script)] if script.exists() else [sys.executable, "-m", "egress_auditor"]


def run_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [*_console_script(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["trace", "-o", "nope"], "valid: iptables"),
        (["trace", "-O", "iptables:verbose:9"], "valid: 0, 1, 2"),
        (["trace", "-t", "abc"], "90s, 5m, 1h"),
        (["trace", "--summary-every", "soon"], "90s, 5m, 1h"),
        (["trace", "-C", "0"], "--count"),
        (["-O", "bad"], "plugin:key:value"),
        (["-i", "nope"], "valid: ebpf"),
        (["trace", "-I", "ebpf:nope:1"], "valid: " + ", ".join(o.key for o in EBPF_PLUGIN.options)),
        (["trace", "--no-such-flag"], "--no-such-flag"),
        (["trace", "-t"], "-t"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_cli_bad_input_is_one_line(args: list[str], mentions: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("egress-auditor: error: ")
    assert mentions in lines[0]
    assert result.stdout == ""


def _expected_listing_words() -> list[str]:
    words = []
    for kind in ("input", "output"):
        for plugin in registered(kind).values():
            words.append(f"  {plugin.name}: {plugin.description}")
            words.extend(f"{plugin.name}:{option.key}" for option in plugin.options)
            words.extend(f"[{'|'.join(option.choices)}]" for option in plugin.options if option.choices)
    return words


@pytest.mark.parametrize("args", [["list"], ["-l"], ["--list"]])
def test_cli_list_names_every_plugin_and_option(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    expected = _expected_listing_words()
    assert len(expected) > 4  # both kinds registered, or the listing proves nothing
    for word in expected:
        assert word in result.stdout


def test_cli_list_forms_agree() -> None:
    outputs = {run_cli(*args).stdout for args in (["list"], ["-l"], ["--list"])}
    assert len(outputs) == 1


def test_cli_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"egress-auditor {egress_auditor.__version__}\n"
    assert result.stderr == ""


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_cli_help(flag: str) -> None:
    result = run_cli(flag)
    assert result.returncode == 0
    for command in ("trace", "list", "doctor"):
        assert command in result.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop to nobody")
def test_cli_doctor_failure_is_exit_status_1(nobody_cli: list[str]) -> None:
    # As nobody the privilege check fails: doctor must say so with status 1, not crash or exit 0.
    result = subprocess.run([*nobody_cli, "doctor"], capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in result.stderr
    assert result.returncode == 1, result.stdout + result.stderr
    assert "MISSING" in result.stdout


def test_count_lines_option_and_how_many_are_built() -> None:
    from egress_auditor.inputs.ebpf import count_lines_for

    chosen = [
        select("input", ["ebpf"], [f"ebpf:count_lines:{v}"], default="ebpf").chosen["ebpf"]["count_lines"]
        for v in ("auto", "off", "4096")
    ]
    assert chosen == ["auto", "off", 4096]
    assert count_lines_for("auto", 65536, "ringbuf") == 32768
    assert count_lines_for("auto", 100, "ringbuf") == 64  # one per two flows, rounded up to a power of two
    assert count_lines_for("auto", 2, "ringbuf") == 1
    assert count_lines_for("auto", 1 << 24, "ringbuf") == 1 << 23  # the largest map that may be asked for
    assert count_lines_for("auto", 1, "ringbuf") == 1
    assert count_lines_for(4096, 65536, "ringbuf") == 4096
    assert count_lines_for("off", 65536, "ringbuf") == 0
    assert count_lines_for("auto", 65536, "perf") == 0  # older kernels: the flow map alone
