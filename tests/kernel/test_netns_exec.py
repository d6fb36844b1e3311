"""`ip netns exec NAME egress-auditor trace -- CMD`: ip netns exec mounts a /sys of its
own, which hides the cgroup v2 hierarchy. The tool mounts one for itself, in a mount
namespace of its own, so the cgroup hooks and the command's cgroup work as elsewhere,
and nothing of it is left once the run ends."""

from __future__ import annotations

import sys
from pathlib import Path

from netns import Namespace

from egress_auditor.attribution.cgroups import AUDIT_CGROUP_PREFIX, cgroup2_mount

EGRESS_AUDITOR = str(Path(sys.executable).with_name("egress-auditor"))
CONNECT = "import socket,sys; socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1])))"
PORT = 18311


def cgroup2_mounts() -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if " - cgroup2 " in line]


def test_a_trace_under_ip_netns_exec_uses_the_cgroup_hooks_and_runs_the_command(client_ns: Namespace) -> None:
    hidden = client_ns.run(["sh", "-c", "grep -c ' - cgroup2 ' /proc/self/mountinfo"], check=False).stdout
    assert hidden.strip() == "0", "ip netns exec no longer hides cgroup v2: this test tests nothing"
    mounts_before = cgroup2_mounts()
    root = cgroup2_mount()
    assert root is not None
    result = client_ns.run(
        [EGRESS_AUDITOR, "trace", "--no-live", "--", "/usr/bin/python3", "-c", CONNECT, str(PORT)],
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "mounted one at /sys/fs/cgroup for this run" in result.stderr
    attached = [line for line in result.stderr.splitlines() if "ebpf input attached" in line]
    assert len(attached) == 1 and "TCP: cgroup connect4/6 hooks at /sys/fs/cgroup," in attached[0], result.stderr
    assert "following the command" in result.stderr
    assert f"-d 127.0.0.1/32 -p tcp -m tcp --dport {PORT} " in result.stdout
    # Nothing left: no mount outside the run's own namespace, no cgroup of the command.
    assert cgroup2_mounts() == mounts_before
    assert not [p for p in root.iterdir() if p.name.startswith(AUDIT_CGROUP_PREFIX)]
    assert client_ns.run(["sh", "-c", "grep -c ' - cgroup2 ' /proc/self/mountinfo"], check=False).stdout.strip() == "0"
