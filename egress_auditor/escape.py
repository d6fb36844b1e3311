"""Escaping of hostile text (process names, command lines) for each target.

Each function is the only way text from a process reaches its target, and each
has property tests in tests/unit/test_escape.py.
"""

from __future__ import annotations

import re

# Characters that mean nothing special to sh inside double quotes, to the
# iptables-restore tokenizer, or to nft inside a quoted string.
_RULE_SAFE = re.compile(r"[A-Za-z0-9 _.,:/@+=()\[\]-]")
COMMENT_MAX = 255  # xt_comment keeps at most 255 bytes


def _percent(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))


def rule_comment(text: str, limit: int = COMMENT_MAX) -> str:
    """Text safe inside a double-quoted rule comment, in sh and in iptables-restore.

    Anything outside a small safe set becomes %XX (so `"` is %22, a newline %0A):
    the result never holds a quote, backslash, dollar, backtick or control byte.
    """
    out: list[str] = []
    size = 0
    for ch in text:
        piece = ch if _RULE_SAFE.fullmatch(ch) else _percent(ch)
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


# iptables-restore reads a line in 10240-byte pieces and parses the rest of a
# longer `#` line as a rule, so comment lines stay well below that.
COMMENT_LINE_MAX = 4000
_CUT = "..."


def comment_line(text: str, limit: int = COMMENT_LINE_MAX) -> str:
    """Text safe after `#` on one line of a shell script or a rules file.

    Printable ASCII stays; control characters, non-ASCII (bidi overrides,
    escape sequences) and `%` become %XX, so the line can neither end early
    nor steer a terminal that later shows the file. Longer than `limit`, it
    is cut and ends in "...".
    """
    pieces = [ch if (" " <= ch <= "~" and ch != "%") else _percent(ch) for ch in text]
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    out: list[str] = []
    size = len(_CUT)
    for piece in pieces:
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out) + _CUT


_TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def terminal_text(text: str) -> str:
    """Text that shows as itself on a terminal: control characters and
    invisible or direction-changing code points become \\xNN or \\uNNNN.
    The result still needs rich.markup.escape or rich.text.Text to be
    kept out of markup parsing; live.py only builds Text objects."""

    def visible(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _TERMINAL_UNSAFE.sub(visible, text.replace("\\", "\\\\"))


NFT_COMMENT_MAX = 128  # nft refuses longer comments: "128 characters maximum allowed"


def nft_comment(text: str, limit: int = NFT_COMMENT_MAX) -> str:
    """Text safe inside a double-quoted nft comment.

    nft's strings end at the next `"` and know no escapes, so the same small
    safe set as rule_comment applies (%XX for the rest), cut to nft's limit.
    """
    return rule_comment(text, limit)


_CGROUP_PART = re.compile(r"[A-Za-z0-9_.:@+=,\\-]+")


def nft_cgroup_path(path: str) -> str | None:
    """A cgroup v2 path as nft's `socket cgroupv2 level N "PATH"` reads it
    (relative to the cgroup2 root), or None if it cannot be written safely.

    nft looks the directory up by this exact name at load time, so it cannot
    be escaped: a path with a quote, space, control or non-ASCII character,
    or a `.`/`..` part, is refused and the caller scopes another way.
    """
    parts = path.strip("/").split("/")
    if not parts or not all(_CGROUP_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        return None
    return "/".join(parts)


_IPTABLES_CGROUP_PART = re.compile(r"[A-Za-z0-9_.:@+=,-]+")


def iptables_cgroup_path(path: str) -> str | None:
    """A cgroup v2 path for `-m cgroup --path` (from the cgroup2 root, with a
    leading /) as one bare word that sh and iptables-restore both read back
    unchanged, or None if it cannot be written so.

    The kernel looks the directory up by this exact name when the rule is
    loaded, so it cannot be escaped; both parsers eat a backslash (systemd's
    \\x2d escapes), so such paths are refused along with quotes, spaces,
    control and non-ASCII characters and `.`/`..` parts.
    """
    parts = path.strip("/").split("/")
    if not all(_IPTABLES_CGROUP_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        return None
    return "/" + "/".join(parts)
