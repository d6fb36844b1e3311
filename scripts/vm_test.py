#!/usr/bin/env python3
"""Run tests/vm inside VMs booting Debian's stock kernels (virtme-ng over QEMU's TCG).

Usage: sudo .venv/bin/python scripts/vm_test.py [--kernel SERIES ...] [--bench] [pytest args]

For each kernel series (default: 6.1 and 6.12 of Debian 12) the newest installed
linux-image with its linux-headers is used, else the newest the registry has is
installed. virtme-ng boots it over this machine's root file system (read-only)
with .cache/vm/<kernel> writable, and runs pytest on tests/vm there. pytest's
output comes back from that folder; a VM that panics or hangs is killed at its
timeout and the end of its console is printed. --bench runs bench/path_cost.py there
instead. Exit status: 0 all passed, 1 a
stage failed, 3 the VM stage cannot run on this machine (one line says why).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CACHE = HERE / ".cache" / "vm"
VNG_VENV = CACHE / "venv"
VNG_VERSION = "1.42"
# Debian 12's default kernel and its newer backport series: both have kprobes, fentry and BTF.
SERIES = {
    "6.1": re.compile(r"^linux-image-(6\.1\.0-\d+-amd64)$"),
    "6.12": re.compile(r"^linux-image-(6\.12\.\d+\+deb12-amd64)$"),
}
# virtme-ng runs `file` on the kernel image; a minimal Debian has none.
HOST_PACKAGES = ("qemu-system-x86", "busybox-static", "file")
BOOT_TIMEOUT_S = 240  # from launch to the stage's first line; TCG boots in about 35 s here
CANNOT_RUN = 3


def say(message: str) -> None:
    print(f"vm: {message}", file=sys.stderr, flush=True)


def version_key(version: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", version)]


def installed(package: str) -> bool:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    ).stdout
    return "install ok installed" in out


_updated = False


def apt_update() -> None:
    global _updated
    if not _updated:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        _updated = True


def apt_install(packages: list[str]) -> None:
    apt_update()
    say(f"installing {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "INITRD": "No"}  # vng boots without an initrd
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600", *packages],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def kernel_for(series: str) -> str:
    """The newest kernel of a series whose image, modules and headers are here; installed if none is."""
    pattern = SERIES[series]
    here = [
        m.group(1)
        for p in Path("/boot").glob("vmlinuz-*")
        if (m := pattern.match("linux-image-" + p.name.removeprefix("vmlinuz-")))
        and (Path("/lib/modules") / m.group(1) / "build" / "include").exists()
        and installed("linux-image-" + m.group(1))
    ]
    if here:
        return max(here, key=version_key)
    apt_update()
    names = subprocess.run(["apt-cache", "pkgnames", "linux-image-6."], capture_output=True, text=True, check=True)
    offered = [m.group(1) for name in names.stdout.split() if (m := pattern.match(name))]
    if not offered:
        raise LookupError(f"no linux-image of series {series} in the package registry")
    version = max(offered, key=version_key)
    apt_install([f"linux-image-{version}", f"linux-headers-{version}"])
    return version


def why_not() -> str | None:
    """Why the VM stage cannot run on this machine, or None."""
    if os.environ.get("EGRESS_AUDITOR_VM", "").lower() in ("0", "off", "no"):
        return "EGRESS_AUDITOR_VM=off"
    if platform.machine() != "x86_64":
        return f"the stock kernels are amd64 and this machine is {platform.machine()}"
    if os.geteuid() != 0:
        return "needs root (to install kernels and load BPF in the VM)"
    if shutil.which("apt-get") is None:
        return "no apt-get to install Debian's kernels"
    return None


def provision() -> Path:
    missing = [p for p in HOST_PACKAGES if not installed(p)]
    if missing:
        apt_install(missing)
    vng = VNG_VENV / "bin" / "vng"
    if not vng.exists():
        say(f"installing virtme-ng {VNG_VERSION} into {VNG_VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VNG_VENV)], check=True)
        subprocess.run(
            [
                str(VNG_VENV / "bin" / "pip"),
                "install",
                "-q",
                "--disable-pip-version-check",
                f"virtme-ng=={VNG_VERSION}",
            ],
            check=True,
        )
    return vng


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    return "\n".join(text.splitlines()[-lines:])


def run_kernel(vng: Path, version: str, mode: str, pytest_args: list[str], timeout_s: float) -> bool:
    """Boot one kernel and run the stage; a boot that never reached the stage is tried once more
    (emulation on a loaded host), a stage that ran and failed is not."""
    for attempt in (1, 2):
        outcome = _boot_and_test(vng, version, mode, pytest_args, timeout_s)
        if outcome is not None:
            return outcome
        if attempt == 1:
            say(f"{version}: the stage never started; booting once more")
    return False


def _boot_and_test(vng: Path, version: str, mode: str, pytest_args: list[str], timeout_s: float) -> bool | None:
    """True: passed; False: failed; None: the VM never reached the stage."""
    out = CACHE / version
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    console = out / "console.log"
    inside = HERE / "tests" / "vm" / "inside.sh"
    command = " ".join(["sh", str(inside), str(out), mode, *(_quote(a) for a in pytest_args)])
    argv = [
        str(vng), "--run", f"/boot/vmlinuz-{version}", "--disable-kvm", "--memory", "2G", "--cpus", "2",
        "--rwdir", str(out), "--verbose", "--append", "panic=-1", "--exec", command,
    ]  # fmt: skip
    say(f"booting {version} (TCG), stage timeout {timeout_s:.0f} s")
    started = time.monotonic()
    with console.open("wb") as log:
        # vng runs virtme-run from PATH: its own venv's bin comes first.
        env = {**os.environ, "PATH": f"{vng.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=HERE,
                                env=env, start_new_session=True)  # fmt: skip
        reason = _watch(proc, out, started, timeout_s)
    elapsed = time.monotonic() - started
    boot = _boot_seconds(out, started)
    pytest_log = out / "pytest.log"
    if pytest_log.exists():
        print(pytest_log.read_text(errors="replace"), end="", flush=True)
    status_file = out / "status"
    status = status_file.read_text().strip() if status_file.exists() else ""
    timing = f"boot {boot}, total {elapsed:.0f} s"
    if reason is None and status == "0":
        say(f"{version}: passed ({timing})")
        return True
    why = reason or (f"pytest exited {status}" if status else "the VM ended before the stage finished")
    say(f"{version}: FAILED: {why} ({timing}); last console lines:")
    print(tail(console), file=sys.stderr, flush=True)
    return None if not (out / "started").exists() else False


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def _boot_seconds(out: Path, started_monotonic: float) -> str:
    """Seconds from launch to the stage's first line (its wall clock stamp, written in the VM)."""
    try:
        stamp = float((out / "started").read_text().strip())
    except (OSError, ValueError):
        return "unknown"
    launched_wall = time.time() - (time.monotonic() - started_monotonic)
    return f"{stamp - launched_wall:.0f} s"


def _watch(proc: subprocess.Popen[bytes], out: Path, started: float, timeout_s: float) -> str | None:
    """Wait for the VM; kill it (QEMU and all) at the boot or stage timeout. The reason, or None."""
    reason = None
    try:
        while proc.poll() is None:
            now = time.monotonic() - started
            if not (out / "started").exists() and now > BOOT_TIMEOUT_S:
                reason = f"no shell after {BOOT_TIMEOUT_S} s (boot hung or panicked)"
            elif now > timeout_s:
                reason = f"stage not finished after {timeout_s:.0f} s (hung)"
            if reason:
                break
            time.sleep(1)
    finally:  # also when this harness is interrupted or terminated: no QEMU outlives it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return reason


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", action="append", choices=sorted(SERIES), help="series to boot (repeatable)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds each kernel's VM may take")
    parser.add_argument("--bench", action="store_true", help="run bench/path_cost.py instead of the tests")
    args, pytest_args = parser.parse_known_args()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))
    reason = why_not()
    if reason:
        say(f"VM stage not run: {reason}")
        return CANNOT_RUN
    try:
        vng = provision()
        kernels = [kernel_for(series) for series in args.kernel or sorted(SERIES, key=version_key)]
    except (subprocess.CalledProcessError, OSError, LookupError) as exc:
        say(f"VM stage not run: provisioning failed: {exc}")
        return CANNOT_RUN
    CACHE.mkdir(parents=True, exist_ok=True)
    mode = "bench" if args.bench else "test"
    results = [run_kernel(vng, version, mode, pytest_args, args.timeout) for version in kernels]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
