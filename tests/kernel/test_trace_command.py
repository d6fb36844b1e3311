"""`egress-auditor trace -- CMD` end to end: the installed command runs in the
client namespace; clients connect to closed ports on its loopback (the kernel
answers RST); the tool is started with nsenter, which leaves /sys (and the
cgroup v2 hierarchy) as it is. Only the command's connections (and its descendants') make
rules; the command's exit status is the tool's; stop signals reach the
command once; the command runs as the sudo user; its cgroup is removed."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

from netns import Namespace

from egress_auditor.attribution.cgroups import cgroup2_mount

EGRESS_AUDITOR = str(Path(sys.executable).with_name("egress-auditor"))
PYTHON = "/usr/bin/python3"
CONNECT = "import socket,sys; socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1])))"
RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
STARTUP_S = 60.0
# Counts SIGINTs, connects, says it is ready, then exits 10 + the count once one came.
COUNTS_SIGINT = (
    "import os,signal,socket,sys,time\n"
    "got = []\n"
    "signal.signal(signal.SIGINT, lambda *_: got.append(1))\n"
    "socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1])))\n"
    "open(sys.argv[2], 'w').close()\n"
    "while not got: time.sleep(0.02)\n"
    "time.sleep(0.5)  # room for a second, duplicated SIGINT\n"
    "sys.exit(10 + len(got))\n"
)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    pid: int


def start(ns: Namespace, args: list[str], tmp: Path, **kwargs: object) -> tuple[subprocess.Popen, Path]:
    err = tmp / f"stderr-{random.randrange(1 << 30)}"
    # nsenter, not ip netns exec: that one remounts /sys and so hides the cgroup v2 hierarchy.
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns.name}", EGRESS_AUDITOR, "trace", "--no-live", *args],
        stdout=subprocess.PIPE,
        stderr=err.open("w"),
        text=True,
        **kwargs,
    )
    return proc, err


def wait_running(proc: subprocess.Popen, err: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while RUNNING_LINE not in err.read_text():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {err.read_text()}"
        assert time.monotonic() < deadline, err.read_text()
        time.sleep(0.05)


def finish(proc: subprocess.Popen, err: Path) -> Run:
    stdout, _ = proc.communicate(timeout=60)
    return Run(proc.returncode, stdout, err.read_text(), proc.pid)


def wait_for(path: Path, proc: subprocess.Popen, err: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while not path.exists():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {err.read_text()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def rule_ports(stdout: str) -> set[int]:
    ports = set()
    for line in stdout.splitlines():
        if line.startswith("iptables -I OUTPUT ") and " -d 127.0.0.1/32 -p tcp" in line:
            ports.add(int(line.split("--dport ")[1].split()[0]))
    return ports


def leftover_cgroups(pid: int) -> list[Path]:
    root = cgroup2_mount()
    assert root is not None
    return list(root.glob(f"egress-auditor-{pid}-*"))


def test_only_the_command_tree_is_recorded_and_its_status_returned(client_ns: Namespace, tmp_path: Path) -> None:
    inside, outside, child = random.sample(range(20000, 60000), 3)
    go = tmp_path / "go"
    script = (
        f'while [ ! -e {go} ]; do sleep 0.02; done; {PYTHON} -c "$0" {inside}; '
        f'({PYTHON} -c "$0" {child} &) ; sleep 0.3; exit 7'
    )
    proc, err = start(client_ns, ["--", "sh", "-c", script, CONNECT], tmp_path)
    wait_running(proc, err)
    # From outside the command, in the same namespace: the same program, user and
    # destination as the command's first connect (one kernel flow key), and one of its own.
    for port in (inside, outside):
        assert client_ns.run([PYTHON, "-c", CONNECT, str(port)]).returncode == 0
    go.touch()
    run = finish(proc, err)
    assert run.returncode == 7, run.stderr
    assert rule_ports(run.stdout) == {inside, child}, run.stdout
    assert "exit status 7" in run.stderr
    assert leftover_cgroups(run.pid) == []


def test_the_status_of_a_command_ended_by_a_signal_or_not_found(client_ns: Namespace, tmp_path: Path) -> None:
    killed = finish(*start(client_ns, ["--", "sh", "-c", "kill -TERM $$"], tmp_path))
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr
    assert killed.stdout.startswith("#!/bin/sh")  # a command that ran: its (empty) rules are printed
    missing = finish(*start(client_ns, ["--", "/nonexistent/egress-auditor-test"], tmp_path))
    assert missing.returncode == 127
    assert missing.stdout == ""  # never ran: no rules at all
    assert "command not found: /nonexistent/egress-auditor-test" in missing.stderr
    assert leftover_cgroups(missing.pid) == []


def test_sigterm_to_the_tool_goes_to_the_command_first(client_ns: Namespace, tmp_path: Path) -> None:
    port = random.randrange(20000, 60000)
    ready = tmp_path / "ready"
    script = f'trap "exit 5" TERM; {PYTHON} -c "$0" {port}; touch {ready}; while :; do sleep 0.05; done'
    proc, err = start(client_ns, ["--", "sh", "-c", script, CONNECT], tmp_path)
    wait_for(ready, proc, err)
    proc.send_signal(signal.SIGTERM)
    run = finish(proc, err)
    assert run.returncode == 5, run.stderr  # the command's trap decided
    assert rule_ports(run.stdout) == {port}


def test_ctrl_c_on_the_terminal_reaches_the_command_once(client_ns: Namespace, tmp_path: Path) -> None:
    port = random.randrange(20000, 60000)
    ready = tmp_path / "ready"
    master, slave = os.openpty()

    def own_terminal() -> None:
        # A session of its own with the pty as controlling terminal: ^C goes to its process group.
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    try:
        proc, err = start(
            client_ns,
            ["--", PYTHON, "-c", COUNTS_SIGINT, str(port), str(ready)],
            tmp_path,
            stdin=slave,
            preexec_fn=own_terminal,
        )
        wait_for(ready, proc, err)
        os.write(master, b"\x03")
        run = finish(proc, err)
    finally:
        os.close(master)
        os.close(slave)
    assert run.returncode == 11, run.stderr  # one SIGINT, from the terminal; the tool passed on none
    assert rule_ports(run.stdout) == {port}


def test_the_command_runs_as_the_sudo_user(client_ns: Namespace, tmp_path: Path) -> None:
    port = random.randrange(20000, 60000)
    env = {**os.environ, "SUDO_UID": "65534", "SUDO_GID": "65534", "SUDO_USER": "nobody"}
    script = f'id -u; id -g; {PYTHON} -c "$0" {port}'
    run = finish(*start(client_ns, ["-O", "iptables:verbose:1", "--", "sh", "-c", script, CONNECT], tmp_path, env=env))
    assert run.returncode == 0, run.stderr
    # The command's output went to stderr; stdout holds only the rules.
    assert [line for line in run.stderr.splitlines() if line == "65534"] == ["65534", "65534"]
    assert "65534" not in [line.strip() for line in run.stdout.splitlines()]
    assert rule_ports(run.stdout) == {port}
    assert "running as nobody" in run.stdout


def test_a_stop_signal_while_loading_ends_the_run_before_the_command_starts(
    client_ns: Namespace, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    proc, err = start(client_ns, ["--", "sh", "-c", f"touch {ran}; sleep 30"], tmp_path)
    deadline = time.monotonic() + STARTUP_S
    # The connect programs are in; the lineage program takes about half a second more to load.
    while "ebpf input attached" not in err.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    run = finish(proc, err)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert "stopped by SIGTERM before the command started" in run.stderr
    assert run.stdout == ""  # never started: no rules
    assert not ran.exists()
    assert leftover_cgroups(run.pid) == []


def test_the_rules_say_how_each_process_was_identified(client_ns: Namespace, tmp_path: Path) -> None:
    # os._exit right after the connect: gone before /proc can be read.
    quick = "import os,socket,sys; socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1]))); os._exit(0)"
    port = random.randrange(20000, 60000)
    lineage = finish(*start(client_ns, ["-O", "iptables:verbose:2", "--", PYTHON, "-c", quick, str(port)], tmp_path))
    assert lineage.returncode == 0, lineage.stderr
    assert "attribution kernel" in lineage.stdout
    assert f"command line: {PYTHON} -c {quick} {port}" in lineage.stdout
    proc_only = finish(
        *start(client_ns, ["--no-lineage", "-O", "iptables:verbose:1", "--", PYTHON, "-c", quick, str(port)], tmp_path)
    )
    assert proc_only.returncode == 0, proc_only.stderr
    assert rule_ports(proc_only.stdout) == {port}
    assert "attribution kernel" not in proc_only.stdout
    assert "process lineage attached" not in proc_only.stderr
