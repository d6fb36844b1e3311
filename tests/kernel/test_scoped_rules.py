"""-O iptables:scope:user|cgroup against real iptables in the client namespace
(never the machine's own firewall) with a DROP policy: the rule lets the uid
or cgroup it was learned from reach the server, and nobody else; hostile
cgroup paths run nothing in sh or iptables-restore."""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flowdata import START, conn, flows_of, proc, summary
from netns import Link, Namespace, http_server

from egress_auditor.attribution.cgroups import cgroup2_mount
from egress_auditor.model import Attribution, Connection
from egress_auditor.plugins import select
from kernel.test_rule_injection import assert_no_markers, hostile_connections

PORT = 18093
NOBODY = 65534
PYTHON = "/usr/bin/python3"  # not a shim under /root, which nobody cannot read
# Exit status 0 when the server answered within a second, 1 when the firewall dropped the SYN.
REACH = (
    "import socket,sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()\n"
    "except OSError:\n"
    "    sys.exit(1)\n"
)


def rules_for(connections: list[Connection], *options: str) -> str:
    output = select("output", ["iptables"], list(options), default="iptables").create()[0]
    return output.finish(flows_of(connections), summary(connections))


def reaches(ns: Namespace, server: str, uid: int = 0, cgroup: Path | None = None) -> bool:
    def setup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text("0\n")

    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", PYTHON, "-c", REACH, server, str(PORT)]
    result = subprocess.run(ns.cmd(argv), preexec_fn=setup, capture_output=True, timeout=30)
    return result.returncode == 0


@pytest.fixture
def service_cgroup() -> Iterator[Path]:
    root = cgroup2_mount()
    assert root is not None, "no cgroup v2 hierarchy"
    path = root / f"ea-scope-{secrets.token_hex(3)}.service"
    path.mkdir()
    yield path
    for _ in range(100):
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.02)  # exited clients are released a moment later


def seen(dst: str, uid: int, cgroup: str | None) -> Connection:
    process = proc(4242, "python3", uid, "someone", ["python3", "client"])
    return conn(dataclasses.replace(process, cgroup=cgroup, attribution=Attribution.KERNEL), dst, PORT, START)


def test_a_cgroup_scoped_rule_admits_that_cgroup_only(net: Link, tmp_path: Path, service_cgroup: Path) -> None:
    root = cgroup2_mount()
    assert root is not None
    relative = "/" + str(service_cgroup.relative_to(root))
    script = tmp_path / "rules.sh"
    script.write_text(rules_for([seen(net.b4, 0, relative)], "iptables:scope:cgroup", "iptables:policy:drop"))
    assert f"-m cgroup --path {relative} " in script.read_text()
    with http_server(net.b, PORT):
        loaded = net.a.run(["sh", str(script)], check=False)
        assert loaded.returncode == 0, loaded.stderr
        assert reaches(net.a, net.b4, cgroup=service_cgroup)
        assert not reaches(net.a, net.b4)  # the same program and user, outside the cgroup


def test_a_user_scoped_restore_file_admits_that_uid_only(net: Link, tmp_path: Path) -> None:
    restore = tmp_path / "rules.v4"
    restore.write_text(
        rules_for(
            [seen(net.b4, NOBODY, None)], "iptables:scope:user", "iptables:format:restore", "iptables:policy:drop"
        )
    )
    with http_server(net.b, PORT):
        loaded = net.a.run(["iptables-restore", str(restore)], check=False)
        assert loaded.returncode == 0, loaded.stderr
        assert reaches(net.a, net.b4, uid=NOBODY)
        assert not reaches(net.a, net.b4, uid=0)


def test_hostile_cgroup_paths_inject_nothing(client_ns: Namespace, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    connections = [
        dataclasses.replace(c, process=dataclasses.replace(c.process, cgroup=f"/ea; touch {markers}/C{i}\n-A OUTPUT"))
        for i, c in enumerate(hostile_connections(markers))
    ]
    script = tmp_path / "rules.sh"
    script.write_text(rules_for(connections, "iptables:scope:cgroup", "iptables:verbose:2"))
    restore = tmp_path / "rules.v4"
    restore.write_text(rules_for(connections, "iptables:scope:cgroup", "iptables:format:restore"))
    ran = client_ns.run(["sh", str(script)], check=False, cwd=markers)
    assert ran.returncode == 0, ran.stderr
    tested = client_ns.run(["iptables-restore", "--test", str(restore)], check=False, cwd=markers)
    assert tested.returncode == 0, tested.stderr
    assert_no_markers(markers)
    loaded = client_ns.run(["iptables-save"]).stdout
    assert "-m cgroup" not in loaded  # unwritable paths fell back to the uid
    assert "--uid-owner" in loaded
