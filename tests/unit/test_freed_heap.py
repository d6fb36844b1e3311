"""actions.release_freed_heap() gives freed heap back to the kernel: glibc keeps
freed blocks below a live one (as the compiler's leave the auditor's heap after
the BPF programs are built), so without it the process's private memory stays."""

from __future__ import annotations

import subprocess
import sys

import pytest

# 80 MB of 1 KB blocks freed, but for the last, which pins the top of the heap: free()
# alone cannot shrink the heap past it, so RssAnon stays until the heap is trimmed.
PROGRAM = """
import ctypes, sys
from egress_auditor.host import actions

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(1024) for _ in range(80_000)]
for block in blocks:
    ctypes.memset(block, 1, 1024)
for block in blocks[:-1]:
    libc.free(block)
before = anon_mb()
trim = sys.argv[1] == "trim"
released = actions.release_freed_heap() if trim else None
print(before, anon_mb(), released)
"""


def run(mode: str) -> tuple[float, float, str]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    before, after, released = out.stdout.split()
    return float(before), float(after), released


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is a Linux /proc figure")
def test_freed_heap_goes_back_to_the_kernel_only_when_released() -> None:
    before, after, _ = run("keep")
    assert before - after < 10, "free() alone returned the heap: the test no longer shows anything"
    before, after, released = run("trim")
    assert released == "True"
    assert before - after > 50, (before, after)
