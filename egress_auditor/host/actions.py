"""What the tool changes on the host: a tracefs mount, and the heap handed back to the kernel.

Each is taken once, where a run needs it; what the host offers (read-only) is in facts.py.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from egress_auditor.host.facts import TRACEFS_CANDIDATES, tracefs


def mount_tracefs() -> Path | None:
    """Mount tracefs where the kernel documents it; None if that fails."""
    target = TRACEFS_CANDIDATES[0]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", str(target).encode(), b"tracefs", 0, None) != 0:
        return None
    return tracefs()


def release_freed_heap() -> bool:
    """Give the heap that compiling the BPF programs freed back to the kernel (glibc keeps it
    otherwise: some 60 MB of private memory for the rest of the run); False where libc has no malloc_trim."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:  # not glibc
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
