"""Property tests for the text that reaches an nft file: comments inside
double quotes, and cgroup paths (which cannot be escaped, only refused)."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from egress_auditor.escape import NFT_COMMENT_MAX, nft_cgroup_path, nft_comment

ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)))
HOSTILE = ['"; flush ruleset; "', "x\n}\ntable ip evil {", "$var", "#c", "\\", "\x00\x1b[2J", "\u202e", "{ } ;", ""]
NFT_SAFE = re.compile(r"[A-Za-z0-9 _.,:/@+=()\[\]%-]*")


@given(ANY_TEXT)
@settings(max_examples=300)
def test_nft_comment_is_safe_and_fits(text: str) -> None:
    out = nft_comment(text)
    # nft strings end at the next quote and know no escapes: none of these may appear.
    assert NFT_SAFE.fullmatch(out), out
    assert len(out.encode()) <= NFT_COMMENT_MAX
    assert re.search("%(?![0-9A-F]{2})", out) is None  # never cut inside an escape
    assert text.startswith(unquote(out, errors="strict"))  # what is kept is what the process said


@pytest.mark.parametrize("sample", HOSTILE)
def test_nft_comment_hostile_samples(sample: str) -> None:
    out = nft_comment(sample)
    assert not set(out) & set('"\\\n\r\x00{};$#')
    assert unquote(out) == sample


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/system.slice/nginx.service", "system.slice/nginx.service"),
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice",
            "user.slice/user-1000.slice/user@1000.service/app.slice",
        ),
        ("/system.slice/system-getty.slice/getty@tty1.service", "system.slice/system-getty.slice/getty@tty1.service"),
        ("/kubepods/burstable/pod1_2/abc:def", "kubepods/burstable/pod1_2/abc:def"),
        ("/system.slice/dev-disk-by\\x2duuid.swap", "system.slice/dev-disk-by\\x2duuid.swap"),
        ("/", None),
        ("", None),
        ('/a"b', None),
        ("/a b", None),
        ("/a/../b", None),
        ("/a/./b", None),
        ("/a//b", None),
        ("/a\nb", None),
        ("/caf\u00e9", None),
        ("/a;b", None),
        ("/a$b", None),
    ],
)
def test_nft_cgroup_path(path: str, expected: str | None) -> None:
    assert nft_cgroup_path(path) == expected


@given(ANY_TEXT)
@example('/x"; flush ruleset; "')
@settings(max_examples=300)
def test_nft_cgroup_path_is_the_path_or_nothing(path: str) -> None:
    out = nft_cgroup_path(path)
    if out is not None:
        # Never rewritten: nft must find this very directory, so it is exact or refused.
        assert out == path.strip("/")
        assert re.fullmatch(r"[A-Za-z0-9_.:@+=,\\/-]+", out)
        assert all(part not in ("", ".", "..") for part in out.split("/"))
