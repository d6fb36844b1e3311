"""Where the BPF sources are, and what every BCC compile of ours passes to clang beyond its own flags."""

from __future__ import annotations

from pathlib import Path

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
