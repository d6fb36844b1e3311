"""ProcessResolver against real processes: exec keeps the pid and start time,
so a cached identity must not outlive the exec."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from egress_auditor.attribution.process import ProcessResolver
from egress_auditor.model import Attribution


def test_a_cached_process_that_execs_is_read_again() -> None:
    # The child reads a line on stdin (as python3), then execs sleep under the same pid.
    child = subprocess.Popen(
        [sys.executable, "-c", "import os,sys; sys.stdin.readline(); os.execv('/bin/sleep', ['sleep', '30'])"],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        resolver = ProcessResolver()
        before = resolver.resolve(child.pid, "python3", os.getuid(), time.time())
        assert before.attribution is Attribution.PROC
        assert before.exe is not None and "python" in os.path.basename(before.exe)
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{child.pid}/comm") as comm:
                if comm.read().strip() == "sleep":
                    break
            time.sleep(0.02)
        after = resolver.resolve(child.pid, "sleep", os.getuid(), time.time())
        assert after.name == "sleep"
        assert after.cmdline == ("sleep", "30")
    finally:
        child.kill()
        child.wait()


def test_an_exited_process_is_reported_by_its_kernel_name_only() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    process = ProcessResolver().resolve(child.pid, "true", 0, time.time())
    assert process.attribution is Attribution.NAME_ONLY
    assert process.name == "true" and process.exe is None and process.cmdline == ()
