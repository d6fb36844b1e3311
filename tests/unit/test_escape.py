"""Property tests for every function that lets process text reach a target:
rule comments, `#` lines, the terminal, and shell words (through real sh)."""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
from urllib.parse import unquote

import pytest
from flowdata import START, conn, proc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.text import Text

from egress_auditor.display.live import new_flow_line
from egress_auditor.escape import COMMENT_LINE_MAX, COMMENT_MAX, comment_line, rule_comment, terminal_text

HOSTILE = [
    '";touch /tmp/P',
    "x\ntouch /tmp/Q",
    "x\r\ntouch /tmp/Q",
    "'\"'\"",
    "`touch /tmp/R`",
    "$(id)",
    "${HOME}",
    "a\\b\\",
    "\\n\\x1b",
    "\x1b]0;owned\x07",
    "\x1b[2J",
    "\x9b31m",
    "\u202eexe.txt",
    "\u2066\u2069\u061c\u200f",
    "nul\x00byte",
    "[bold red]x[/]",
    "[link=http://evil]y[/link]",
    ":skull:",
    "%41%",
    "#comment",
    "-A OUTPUT -j ACCEPT",
    "\x7f\x80\x85\x9f",
    "caf\u00e9 \U0001f600 \u4e2d",
    "\ufeff\u2028\u2029",
    "",
    " ",
]

# Every Unicode category; surrogates cannot be encoded and never come from /proc.
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)))
ANY_TEXT_NO_NUL = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))

C0_C1_DEL = re.compile("[\x00-\x1f\x7f-\x9f]")
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
RULE_SAFE_OUTPUT = re.compile(r"[A-Za-z0-9 _.,:/@+=()\[\]%-]*")
BAD_PERCENT = re.compile("%(?![0-9A-F]{2})")


def with_hostile(test):  # type: ignore[no-untyped-def]
    """Always try the hand-picked samples as well as what hypothesis generates."""
    for sample in HOSTILE:
        test = example(sample)(test)
    return test


# ---------------------------------------------------------------- rule comments


@given(ANY_TEXT)
@with_hostile
@settings(max_examples=300)
def test_rule_comment_safe_set_and_length(text: str) -> None:
    out = rule_comment(text)
    assert RULE_SAFE_OUTPUT.fullmatch(out), out
    assert len(out.encode()) <= COMMENT_MAX
    assert BAD_PERCENT.search(out) is None  # cut only between whole escapes
    assert rule_comment(text) == out  # stable: the same name always gives the same comment


@given(ANY_TEXT)
@with_hostile
@settings(max_examples=300)
def test_rule_comment_loses_nothing_but_the_tail(text: str) -> None:
    # Decoding the %XX escapes gives back a prefix of the text: all of it when it fits.
    out = rule_comment(text)
    decoded = unquote(out, errors="strict")
    assert text.startswith(decoded)
    full = rule_comment(text, limit=10**9)
    assert full.startswith(out)
    if len(full) <= COMMENT_MAX:
        assert out == full and decoded == text
    else:
        assert len(out) > COMMENT_MAX - 12  # at most one UTF-8 character's escape short


@pytest.mark.parametrize("sample", HOSTILE)
def test_rule_comment_inside_double_quotes_in_real_sh(sample: str) -> None:
    # Nothing in the comment means anything to sh inside double quotes.
    out = rule_comment(sample)
    result = subprocess.run(["sh", "-c", f'printf %s "{out}"'], capture_output=True, text=True, timeout=10, check=True)
    assert result.stdout == out


# ---------------------------------------------------------------- comment lines


@given(ANY_TEXT)
@with_hostile
@settings(max_examples=300)
def test_comment_line_is_one_line_of_printable_ascii(text: str) -> None:
    out = comment_line(text)
    assert re.fullmatch("[ -~]*", out), out  # no newline, CR, control or non-ASCII character
    assert len(out) <= COMMENT_LINE_MAX
    assert BAD_PERCENT.search(out) is None
    if len(comment_line(text, limit=10**9)) <= COMMENT_LINE_MAX:
        assert unquote(out, errors="strict") == text  # nothing lost when it fits


@given(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=COMMENT_LINE_MAX // 3, max_size=COMMENT_LINE_MAX * 3)
)
@example("\u00e9" * 3000)
@example("A" * 20000 + "\n-A OUTPUT -j ACCEPT")
@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_comment_line_long_text_is_cut(text: str) -> None:
    out = comment_line(text)
    assert len(out) <= COMMENT_LINE_MAX
    full = comment_line(text, limit=10**9)
    if len(full) > COMMENT_LINE_MAX:
        assert len(out) > COMMENT_LINE_MAX - 15  # cut at the limit, not far before it
        assert out.endswith("...")
        assert full.startswith(out[:-3])


def test_comment_line_hostile_samples() -> None:
    assert comment_line("x\ntouch /tmp/Q") == "x%0Atouch /tmp/Q"
    assert comment_line("\x1b]0;owned\x07") == "%1B]0;owned%07"
    assert comment_line("\u202e") == "%E2%80%AE"
    assert comment_line("100%") == "100%25"


# ---------------------------------------------------------------- the terminal

_VISIBLE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})")


def from_terminal(text: str) -> str:
    """Undo terminal_text: proves it loses nothing and is unambiguous."""

    def original(match: re.Match[str]) -> str:
        code = match.group(1)
        return "\\" if code == "\\" else chr(int(code[1:], 16))

    return _VISIBLE.sub(original, text)


@given(ANY_TEXT)
@with_hostile
@settings(max_examples=300)
def test_terminal_text_has_no_controls(text: str) -> None:
    out = terminal_text(text)
    assert C0_C1_DEL.search(out) is None
    assert BIDI_CONTROLS.search(out) is None
    assert from_terminal(out) == text


@given(ANY_TEXT)
@with_hostile
@settings(max_examples=200)
def test_rich_shows_terminal_text_as_is(text: str) -> None:
    # Defaults for markup, emoji and highlighting: a Text must escape all of them.
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=80, soft_wrap=True)
    console.print(Text(terminal_text(text)), end="")
    assert buffer.getvalue() == terminal_text(text)


def test_terminal_text_plain_names_unchanged() -> None:
    for name in ("curl", "apt-get", "kworker/u8:2", "caf\u00e9", "\u4e2d\u6587"):
        assert terminal_text(name) == name


@given(ANY_TEXT)
@with_hostile
@settings(max_examples=200)
def test_new_flow_line_has_no_controls(text: str) -> None:
    hostile = proc(4242, text, 1000, text, [text], parent=proc(1, text, 0, "root"))
    line = new_flow_line(conn(hostile, "192.0.2.10", 443, START))
    assert C0_C1_DEL.search(line) is None
    assert BIDI_CONTROLS.search(line) is None
    assert line.startswith("new TCP connection 10.0.0.2:")
    user = terminal_text(text) if text else "1000"  # no user name: the uid is shown
    assert f" by {terminal_text(text)} (pid 4242, user {user})" in line


def test_new_flow_line_ipv6() -> None:
    line = new_flow_line(conn(proc(7, "\x1b[2J", 0, "root"), "2001:db8::1", 443, START))
    assert "-> [2001:db8::1]:443" in line
    assert "by \\x1b[2J (pid 7" in line


def test_new_flow_line_leaves_out_an_unknown_source() -> None:
    known = conn(proc(7, "curl", 0, "root"), "192.0.2.10", 443, START)
    assert new_flow_line(known).startswith("new TCP connection 10.0.0.2:40007 -> 192.0.2.10:443(https) by curl")
    for unknown in (
        dataclasses.replace(known, src=None, sport=None),
        dataclasses.replace(known, src=None, sport=40007),
    ):
        assert new_flow_line(unknown).startswith("new TCP connection -> 192.0.2.10:443(https) by curl (pid 7")
    source_only = dataclasses.replace(known, sport=None)
    assert new_flow_line(source_only).startswith("new TCP connection 10.0.0.2 -> 192.0.2.10:443(https) by curl")
