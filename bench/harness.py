"""The benchmark's pieces: building the load generator, a network namespace,
the loopback server and client, tracers started in the background, /proc
figures of a process, and reading the auditor's rules back."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.checkout import ROOT, TESTS, first_on_path

BENCH_DIR = ROOT / "bench"
BUILD_DIR = BENCH_DIR / "build"
LOADGEN_SRC = BENCH_DIR / "loadgen.c"
PORT_BASE = 31000
ADDRS_PER_OCTET = 200  # mirrors bench_addr() in loadgen.c


def bench_address(index: int) -> str:
    """The address of the load generator's index-th destination (as in loadgen.c)."""
    return f"127.100.{1 + index // ADDRS_PER_OCTET}.{1 + index % ADDRS_PER_OCTET}"


def build_loadgen(build_dir: Path = BUILD_DIR) -> Path:
    """Compile bench/loadgen.c with the machine's gcc (again only when the source changed)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    binary = build_dir / "loadgen"
    if binary.exists() and binary.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return binary
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(LOADGEN_SRC)],
        check=True,
        capture_output=True,
        text=True,
    )
    return binary


# -- network namespace ---------------------------------------------------------


# One namespace helper for the tests and the benchmarks, imported by the name the tests give it.
first_on_path(TESTS)
from netns import Namespace  # noqa: E402
from netns import namespace as _test_namespace  # noqa: E402


def namespace() -> AbstractContextManager[Namespace]:
    """A fresh namespace with loopback up, deleted afterwards with whatever still runs in it."""
    return _test_namespace("bench")


# -- load generator --------------------------------------------------------------


@contextmanager
def server(
    ns: Namespace, loadgen: Path, ports: int, lifetime_s: int, udp: bool = False
) -> Iterator[subprocess.Popen[str]]:
    """The accept-and-close server (or, with udp, the datagram reader) on PORT_BASE.. in ns;
    it exits by itself after lifetime_s."""
    proc = subprocess.Popen(
        ns.cmd([str(loadgen), "udp-server" if udp else "server", str(PORT_BASE), str(ports), str(lifetime_s)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"load generator server did not start: {line!r}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class ClientResult:
    connects: int  # all connect() calls, warm-up included
    timed_connects: int
    seconds: float
    rate: float  # timed connects per second
    cpu_seconds: float  # the client's own CPU time (user + system) in the timed part
    failures: int
    errors: dict[str, int]
    flows: dict[tuple[str, int], int] = field(default_factory=dict)  # (address, port) -> connect() calls
    p50_us: float = 0.0  # the latency load's connect() call, median and 99th percentile (microseconds)
    p99_us: float = 0.0


def run_client(
    ns: Namespace,
    loadgen: Path,
    addrs: int,
    ports: int,
    *,
    warmup: int = 0,
    count: int = 0,
    seconds: float = 0,
    flows_out: Path | None = None,
    kind: str = "client",
) -> ClientResult:
    """One client run; with flows_out, the per-flow counts are read back too.
    kind: "client" (TCP connects), "latency" (the same, each connect() timed: needs a count),
    "udp-sendto" or "udp-connect" (one datagram per flow in turn)."""
    argv = [str(loadgen), kind, str(addrs), str(PORT_BASE), str(ports), str(warmup), str(count)]
    argv.append(f"{seconds:g}")
    if flows_out is not None:
        argv.append(str(flows_out))
    limit = (seconds or 0) + 600  # the client bounds itself; this only guards against a hang
    out = subprocess.run(ns.cmd(argv), capture_output=True, text=True, check=True, timeout=limit)
    data = json.loads(out.stdout)
    result = ClientResult(
        connects=data["connects"],
        timed_connects=data["timed_connects"],
        seconds=data["seconds"],
        rate=data["rate"],
        cpu_seconds=data["cpu_seconds"],
        failures=data["failures"],
        errors=data["errors"],
        p50_us=data.get("p50_us", 0.0),
        p99_us=data.get("p99_us", 0.0),
    )
    if flows_out is not None:
        for line in flows_out.read_text().splitlines():
            address, port, attempts, _failures = line.split()
            result.flows[(address, int(port))] = int(attempts)
    return result


# -- /proc figures -----------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: fields count from the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_mb(pid: int, key: str = "VmRSS") -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM, ...) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def program_ids(pid: int) -> set[int]:
    """The BPF programs a process holds, by the kernel's id (program and link fds both name theirs)."""
    ids = set()
    for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = fd.read_text()
        except OSError:  # closed meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def other_tracers(own: set[int]) -> int:
    """Other processes holding BPF programs (tests, other tracers): each may add cost to every connect."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own or int(entry.name) == os.getpid():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if "anon_inode:bpf-prog" in links:
            count += 1
    return count


def programs_on_cgroup_root() -> int:
    """Programs attached at the cgroup v2 root: one attached without a link outlives its process
    (a crashed experiment) and runs on every connect or packet, unseen by other_tracers()."""
    from egress_auditor.host import facts

    root = facts.cgroup2_root()
    if root is None or shutil.which("bpftool") is None:
        return 0
    out = subprocess.run(["bpftool", "cgroup", "show", str(root)], capture_output=True, text=True, check=False)
    return sum(1 for line in out.stdout.splitlines()[1:] if line.strip())


@contextmanager
def bpf_stats() -> Iterator[None]:
    """Per-program run counters on for the block (they cost a clock read per run themselves)."""
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    try:
        yield
    finally:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)


def bpf_programs() -> dict[int, dict[str, Any]]:
    """Every BPF program loaded, by id, as bpftool shows it (with run counters while bpf_stats are on)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"]: p for p in json.loads(out)}


# -- tracers in the background -------------------------------------------------------


class LogTail:
    """Reads a growing log file from where it last stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = ""

    def new_lines(self) -> list[str]:
        with self.path.open("r", errors="replace") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            self._offset = handle.tell()
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        return lines


@dataclass
class Stopped:
    returncode: int
    stdout: str
    stderr: str


class Tracer:
    """A tracer process started in the background: stderr goes to a file we
    watch for its running line (a pipe nobody reads would block it)."""

    def __init__(self, argv: Sequence[str], running_marker: str, workdir: Path, label: str) -> None:
        self.argv = list(argv)
        self.marker = running_marker
        self.stdout_path = workdir / f"{label}.stdout"
        self.stderr_path = workdir / f"{label}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0
        self.log = LogTail(self.stderr_path)
        self.lines: list[str] = []

    def start(self, timeout_s: float = 60.0) -> float:
        """Start and wait for the running line; returns the seconds it took."""
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            began = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        while True:
            if any(self.marker in line for line in self.read_lines()):
                self.startup_s = time.monotonic() - began
                return self.startup_s
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited before running: {self.stderr_path.read_text()[-2000:]}")
            if time.monotonic() - began > timeout_s:
                self.kill()
                raise RuntimeError(f"{self.argv[0]} not running after {timeout_s:.0f}s")
            time.sleep(0.005)

    def read_lines(self) -> list[str]:
        """Lines of stderr written since the last call (all of them are kept in .lines)."""
        fresh = self.log.new_lines()
        self.lines.extend(fresh)
        return fresh

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout_s: float = 120.0) -> Stopped:
        """SIGINT, as a user's ctrl-c; the tracer writes its results and exits."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.argv[0]} did not stop within {timeout_s:.0f}s of SIGINT") from None
        self.read_lines()
        return Stopped(code, self.stdout_path.read_text(errors="replace"), self.stderr_path.read_text(errors="replace"))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def running(tracer: Tracer) -> Iterator[Tracer]:
    """Start a tracer for a block; a block that fails still leaves no tracer behind."""
    tracer.start()
    try:
        yield tracer
    finally:
        tracer.kill()


# -- the auditor under test ------------------------------------------------------------

AUDITOR_RUNNING = "egress-auditor is running"
SYNC_MARGIN_S = 1.5  # the auditor folds kernel counts at least once a second


def auditor_command() -> list[str]:
    """This environment's auditor (beside its interpreter): another one first on PATH is another build."""
    beside = Path(sys.executable).parent / "egress-auditor"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("egress-auditor")
    return [found] if found else [sys.executable, "-m", "egress_auditor"]


# -- the auditor's output --------------------------------------------------------------

NEW_FLOW = re.compile(r"-> (127\.100\.\d+\.\d+):(\d+)")
RULE_COUNT = re.compile(r"^# TCP to (\S+) port (\d+): (\d+) connection\(s\)")
STOPPED = re.compile(r"stopped \(.*\): (\d+) flows, (\d+) connections, (\d+) events lost")


def new_bench_flows(lines: Sequence[str]) -> set[tuple[str, int]]:
    """Flows to the load generator's addresses announced on stderr ("new TCP connection ... -> a:p")."""
    found = set()
    for line in lines:
        match = NEW_FLOW.search(line)
        if match:
            found.add((match.group(1), int(match.group(2))))
    return found


def rule_counts(rules_text: str, prefix: str = "127.100.") -> dict[tuple[str, int], int]:
    """(destination, port) -> connections, from `-O iptables:verbose:1` output."""
    counts = {}
    for line in rules_text.splitlines():
        match = RULE_COUNT.match(line)
        if match and match.group(1).startswith(prefix):
            counts[(match.group(1), int(match.group(2)))] = int(match.group(3))
    return counts


def wait_for_flows(tracer: Tracer, seen: set[tuple[str, int]], expected: int, timeout_s: float) -> set[tuple[str, int]]:
    """Wait until the auditor has announced `expected` load generator flows (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while len(seen) < expected and time.monotonic() < deadline:
        seen |= new_bench_flows(tracer.read_lines())
        time.sleep(0.05)
    return seen


# -- statistics ---------------------------------------------------------------------------


@dataclass
class Spread:
    median: float
    low: float  # minimum
    high: float  # maximum
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        data = sorted(values)
        if len(data) >= 2:
            q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
        else:
            q1 = q3 = data[0]
        return cls(statistics.median(data), data[0], data[-1], q1, q3, len(data))

    def as_dict(self, digits: int = 4) -> dict[str, float | int]:
        return {
            "median": round(self.median, digits),
            "min": round(self.low, digits),
            "max": round(self.high, digits),
            "q1": round(self.q1, digits),
            "q3": round(self.q3, digits),
            "n": self.n,
        }


def bootstrap_ci(values: Sequence[float], resamples: int = 10_000, level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of the median (seeded: a run's figure does not move on rereading)."""
    rng = random.Random(0)
    data = list(values)
    medians = sorted(statistics.median(rng.choices(data, k=len(data))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * (resamples - 1))], medians[int((1 - tail) * (resamples - 1))]
