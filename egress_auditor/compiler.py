"""What every BCC compile of ours passes to clang beyond its own flags."""

from __future__ import annotations

# Stock kernels' headers make BCC's clang print a hundred lines of warnings before the tool's first
# line; they say nothing about our programs. --debug shows them.
_show_warnings = False


def show_warnings(on: bool) -> None:
    global _show_warnings
    _show_warnings = on


def warning_flags() -> list[str]:
    return [] if _show_warnings else ["-w"]
