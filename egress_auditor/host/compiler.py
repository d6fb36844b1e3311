"""Where the BPF sources are, and how every BCC compile of ours is made: bpf/ files joined into one
compile unit, and what it passes to clang beyond its own flags."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from egress_auditor.errors import AuditorError

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"  # shipped inside the package (wheel)

# Stock kernels' headers make BCC's clang print a hundred lines of warnings before the tool's first
# line; they say nothing about our programs. --debug shows them.
_show_warnings = False


def show_warnings(on: bool) -> None:
    global _show_warnings
    _show_warnings = on


def warning_flags() -> list[str]:
    return [] if _show_warnings else ["-w"]


def bpf_source_dir() -> Path:
    """bpf/ beside the package (checkout, editable install) or shipped inside it."""
    for candidate in (BPF_DIR, Path(__file__).resolve().parents[2] / "bpf"):
        if (candidate / "flow_map.bpf.c").exists():
            return candidate
    raise AuditorError(f"BPF sources not found (looked in {BPF_DIR})")


def compile_unit(names: Iterable[str], src: Path) -> bytes:
    """Files of bpf/ joined into one compile unit, each under its own name in clang's messages."""
    return "\n".join(f'#line 1 "{name}"\n' + (src / name).read_text() for name in names).encode()


def compile_bpf(text: bytes, cflags: list[str]) -> Any:
    """BCC's object of one compile unit of ours (cflags name bpf/ with -I), clang's warnings as --debug asks."""
    from bcc import BPF  # imported late: `list`, `doctor` and the unit tests work without BCC

    return BPF(text=text, cflags=[*cflags, *warning_flags()])
