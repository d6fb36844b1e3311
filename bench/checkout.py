"""This checkout, first on sys.path: the one way the benchmarks find the project.

A bench script run as a file (`.venv/bin/python bench/run.py`) has bench/ as sys.path[0] and
neither `bench` nor this checkout's `egress_auditor` on it, so its first import is this module by
its bare name (`if not __package__: import checkout`), which puts the project root first. The
harness puts tests/ first through first_on_path() too, for the namespace helper it shares with the
tests (tests/netns.py)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def first_on_path(directory: Path) -> None:
    """Put a directory first on sys.path: an editable install elsewhere (another worktree) must not win."""
    entry = str(directory)
    if sys.path[:1] != [entry]:
        sys.path.insert(0, entry)


first_on_path(ROOT)
