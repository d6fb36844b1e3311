"""Secrets in command lines, replaced by `***` before any output sees them.

Command lines are shipped for weeks to files and to Loki: a password given to
curl must not travel with them. The usual forms are recognised (see
SECRET_FLAGS and the patterns below); the rest of each argument is kept, so a
command line still says what ran. `trace --raw-cmdlines` keeps them whole.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache

from egress_auditor.model import Process

MASK = "***"

# Flags whose next word (or `--flag=value`) is a secret as a whole.
SECRET_FLAGS = frozenset({"-p", "--password", "--passwd", "--pass", "--token", "--secret"})
# Flags whose next word is `user:password`: the part after the first colon is the secret.
USER_FLAGS = frozenset({"-u", "--user", "--proxy-user"})

# scheme://user:password@host
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*:)[^/\s@'\"]+(@)")
# token=, secret=, key=, password= (and api_key=, access_token=, ...): the value up to a separator.
_KEY_VALUE = re.compile(r"(?i)((?:token|secret|key|password|passwd)=)[^&\s'\";]+")
# An Authorization or Cookie header: its value up to the end of the argument (or a quote in a shell string).
_HEADER = re.compile(r"(?i)((?:proxy-)?authorization|cookie)(\s*:\s*)[^'\"\n]+")
# One word of an argument, with what separates it from the next.
_WORD = re.compile(r"(\S+)(\s*)")


def _in_text(text: str) -> str:
    text = _URL_CREDENTIALS.sub(rf"\g<1>{MASK}\g<2>", text)
    text = _HEADER.sub(rf"\g<1>\g<2>{MASK}", text)
    return _KEY_VALUE.sub(rf"\g<1>{MASK}", text)


def _user_value(value: str) -> str:
    user, colon, _ = value.partition(":")
    return f"{user}:{MASK}" if colon else value


def _flagged(word: str, pending: str | None) -> tuple[str, str | None]:
    """The word with a flag's secret value masked, and what the next word is (a secret, a user:password)."""
    if pending == "secret":
        return MASK, None
    if pending == "user":
        return _user_value(word), None
    flag, eq, value = word.partition("=")
    if eq and flag in SECRET_FLAGS and flag.startswith("--"):
        return f"{flag}={MASK}", None
    if eq and flag in USER_FLAGS and flag.startswith("--"):
        return f"{flag}={_user_value(value)}", None
    if word in SECRET_FLAGS:
        return word, "secret"
    if word in USER_FLAGS:
        return word, "user"
    if word.startswith("-u") and not word.startswith("--") and ":" in word:  # -uadmin:secret
        return "-u" + _user_value(word[2:]), None
    if word.startswith("-p") and len(word) > 2 and not word.startswith("--"):  # mysql's -psecret
        return "-p" + MASK, None
    return word, None


@lru_cache(maxsize=1024)  # argv of up to 512 bytes each: about 1 MB at most
def redact_cmdline(argv: tuple[str, ...]) -> tuple[str, ...]:
    """argv with the secrets it carries replaced by ***, each argument otherwise kept.

    Flags are followed across arguments and inside one (`sh -c "curl -u a:b ..."`).
    """
    out: list[str] = []
    pending: str | None = None
    for arg in argv:
        pieces = []
        words = list(_WORD.finditer(arg))
        lead = arg[: words[0].start()] if words else arg
        for match in words:
            word, pending = _flagged(match.group(1), pending)
            pieces.append(word + match.group(2))
        out.append(_in_text(lead + "".join(pieces)))
    return tuple(out)


def redact_process(process: Process) -> Process:
    """The process (and its parents) with command lines redacted; the same object if nothing changed."""
    parent = redact_process(process.parent) if process.parent is not None else None
    cmdline = redact_cmdline(process.cmdline) if process.cmdline else process.cmdline
    if cmdline == process.cmdline and parent is process.parent:
        return process
    return dataclasses.replace(process, cmdline=cmdline, parent=parent)
