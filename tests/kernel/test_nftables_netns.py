"""The nftables output against real nft, inside network namespaces made for
the test (never the machine's own ruleset): `nft -c -f` accepts it, loading
it twice gives the same table and leaves other tables alone, it passes what
was seen and blocks what was not for real clients (curl, python) to a real
server, scoped by uid and by cgroup, and hostile names inject nothing."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from flowdata import START, conn, flows_of, proc, sample_connections, summary
from netns import Link, Namespace, http_server

from egress_auditor.escape import nft_cgroup_path, nft_comment
from egress_auditor.model import Attribution, Connection, Flow, Process
from egress_auditor.outputs.nftables import TABLE, scoped_rules
from egress_auditor.plugins import select
from egress_auditor.rules.rule import comment_text
from kernel.test_rule_injection import assert_no_markers, hostile_connections

SEEN, ALSO_SEEN, UNSEEN = 18090, 18092, 18091
NOBODY = 65534
CLIENT = proc(4242, "curl", 0, "root", ["curl", "-sS", "http://server/"])


def render(flows: list[Flow], connections: list[Connection], *options: str) -> str:
    output = select("output", ["nftables"], list(options), default="nftables").create()[0]
    return output.finish(flows, summary(connections))


def nft(ns: Namespace, *args: str, cwd: Path | None = None, cgroup2: bool = False) -> subprocess.CompletedProcess:
    """nft inside ns; with cgroup2, cgroup v2 is mounted at /sys/fs/cgroup first,
    in the private mount namespace `ip netns exec` gives this command only."""
    argv = ["nft", *args]
    if cgroup2:
        argv = ["sh", "-c", 'mount -t cgroup2 none /sys/fs/cgroup && exec "$@"', "sh", *argv]
    return ns.run(argv, check=False, cwd=cwd)


def load(ns: Namespace, path: Path, cgroup2: bool = False) -> None:
    checked = nft(ns, "-c", "-f", str(path), cgroup2=cgroup2)
    assert checked.returncode == 0, checked.stderr
    loaded = nft(ns, "-f", str(path), cgroup2=cgroup2)
    assert loaded.returncode == 0, loaded.stderr


def table_json(ns: Namespace) -> list[dict[str, Any]]:
    out = nft(ns, "-j", "list", "table", "inet", TABLE)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["nftables"]


def allowed_in_table(ns: Namespace) -> Counter[tuple[str, ...]]:
    """What the loaded table allows: each set element and each destination rule, with its comment."""
    found: Counter[tuple[str, ...]] = Counter()
    for item in table_json(ns):
        if "set" in item:
            for element in item["set"].get("elem", []):
                elem = element["elem"]
                found[(*map(str, elem["val"]["concat"]), elem.get("comment", ""))] += 1
        elif "rule" in item and "comment" in item["rule"] and "@allow_" not in json.dumps(item["rule"]):
            rule = item["rule"]
            values = [str(m["match"]["right"]) for m in rule["expr"] if "match" in m]
            found[(*values, rule["comment"])] += 1
    return found


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def curl(ns: Namespace, host: str, port: int, prefix: Sequence[str] = ()) -> int:
    argv = [*prefix, "curl", "-sS", "-o", "/dev/null", "--connect-timeout", "1", "--max-time", "3", url(host, port)]
    return ns.run(argv, check=False).returncode


def python_client(ns: Namespace, host: str, port: int) -> int:
    probe = "import socket,sys\ns=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1); s.close()"
    return ns.run(["python3", "-c", probe, host, str(port)], check=False).returncode


@pytest.fixture
def servers(net: Link) -> Iterator[Link]:
    with http_server(net.b, SEEN), http_server(net.b, ALSO_SEEN), http_server(net.b, UNSEEN):
        for host in (net.b4, net.b6):
            for port in (SEEN, ALSO_SEEN, UNSEEN):
                assert curl(net.a, host, port) == 0, f"{host}:{port} unreachable before any rule"
        yield net


def seen(net: Link, ports: Sequence[int], process: Process = CLIENT) -> list[Connection]:
    return [
        conn(process, host, port, START + i)
        for i, (host, port) in enumerate((h, p) for h in (net.b4, net.b6) for p in ports)
    ]


# ---------------------------------------------------------------- nft accepts every form


@pytest.mark.parametrize(
    "options",
    [(), ("nftables:policy:drop", "nftables:verbose:2"), ("nftables:scope:user", "nftables:verbose:1")],
)
def test_nft_check_accepts_the_sample_ruleset(client_ns: Namespace, tmp_path: Path, options: tuple[str, ...]) -> None:
    connections = sample_connections()
    path = tmp_path / "rules.nft"
    path.write_text(render(flows_of(connections), connections, *options))
    load(client_ns, path)
    allowed = allowed_in_table(client_ns)
    assert sum(allowed.values()) == len(
        scoped_rules(flows_of(connections), "user" if options[:1] == ("nftables:scope:user",) else "none")
    )


def test_loading_twice_is_idempotent_and_leaves_other_tables(client_ns: Namespace, tmp_path: Path) -> None:
    other = tmp_path / "other.nft"
    other.write_text("table inet other {\n chain out {\n  type filter hook output priority 10;\n  counter\n }\n}\n")
    assert nft(client_ns, "-f", str(other)).returncode == 0
    connections = sample_connections()
    path = tmp_path / "rules.nft"
    path.write_text(render(flows_of(connections), connections, "nftables:policy:drop"))
    load(client_ns, path)
    first = nft(client_ns, "list", "table", "inet", TABLE).stdout
    load(client_ns, path)
    assert nft(client_ns, "list", "table", "inet", TABLE).stdout == first
    tables = nft(client_ns, "list", "tables").stdout.split("\n")
    assert sorted(t for t in tables if t) == ["table inet egress_auditor", "table inet other"]
    assert "counter" in nft(client_ns, "list", "table", "inet", "other").stdout
    # A smaller capture replaces the table's content: nothing from the first load is left.
    fewer = sample_connections()[:1]
    path.write_text(render(flows_of(fewer), fewer))
    load(client_ns, path)
    assert sum(allowed_in_table(client_ns).values()) == 1


# ---------------------------------------------------------------- what was seen passes, the rest is blocked


@pytest.mark.parametrize("ports", [(SEEN,), (SEEN, ALSO_SEEN)], ids=["rules", "sets"])
def test_drop_policy_passes_seen_and_blocks_unseen(servers: Link, tmp_path: Path, ports: tuple[int, ...]) -> None:
    net = servers
    connections = seen(net, ports)
    path = tmp_path / "rules.nft"
    text = render(flows_of(connections), connections, "nftables:policy:drop", "nftables:verbose:1")
    assert ("@allow_ipv4" in text) == (len(ports) > 1)
    path.write_text(text)
    load(net.a, path)
    # Forget IPv6 neighbours: reaching the server again needs neighbour discovery through the drop policy.
    net.a.run(["ip", "-6", "neigh", "flush", "all"])
    for host in (net.b4, net.b6):
        for port in ports:
            assert curl(net.a, host, port) == 0, f"seen {host}:{port} was blocked"
            assert python_client(net.a, host, port) == 0
        assert curl(net.a, host, UNSEEN) != 0, f"unseen {host}:{UNSEEN} was allowed"
        assert python_client(net.a, host, UNSEEN) != 0


def test_user_scope_passes_only_that_user(servers: Link, tmp_path: Path) -> None:
    net = servers
    nobody = proc(5000, "curl", NOBODY, "nobody", ["curl"])
    connections = [conn(nobody, net.b4, SEEN, START), conn(nobody, net.b6, SEEN, START)]
    path = tmp_path / "rules.nft"
    path.write_text(render(flows_of(connections), connections, "nftables:policy:drop", "nftables:scope:user"))
    load(net.a, path)
    as_nobody = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    for host in (net.b4, net.b6):
        assert curl(net.a, host, SEEN, as_nobody) == 0
        assert curl(net.a, host, SEEN) != 0  # root was not seen going there
        assert curl(net.a, host, UNSEEN, as_nobody) != 0


def cgroup2_root() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    raise AssertionError("no cgroup2 mount: the cgroup scope needs cgroup v2")


@pytest.fixture
def service_cgroup() -> Iterator[str]:
    """A cgroup of the test's own, two levels deep, with a systemd-style escape in its name."""
    top = f"ea-test-{uuid.uuid4().hex[:8]}"
    leaf = "svc\\x2dweb.service"
    path = cgroup2_root() / top / leaf
    path.mkdir(parents=True)
    try:
        yield f"/{top}/{leaf}"
    finally:
        for directory in (path, path.parent):
            for _ in range(50):  # a killed client leaves its cgroup a moment later
                try:
                    directory.rmdir()
                    break
                except OSError:
                    subprocess.run(["sleep", "0.1"], check=False)


def test_cgroup_scope_passes_only_that_cgroup(servers: Link, tmp_path: Path, service_cgroup: str) -> None:
    net = servers
    web = dataclasses.replace(
        proc(6000, "curl", 0, "root", ["curl"]),
        cgroup=service_cgroup,
        service="svc-web.service",
        attribution=Attribution.KERNEL,
    )
    connections = [conn(web, net.b4, SEEN, START), conn(web, net.b6, SEEN, START)]
    path = tmp_path / "rules.nft"
    text = render(flows_of(connections), connections, "nftables:policy:drop", "nftables:scope:cgroup")
    assert f'socket cgroupv2 level 2 "{nft_cgroup_path(service_cgroup)}"' in text
    path.write_text(text)
    load(net.a, path, cgroup2=True)
    # The client joins the cgroup, then becomes curl; cgroup2 is mounted in its own mount namespace.
    procs = f"/sys/fs/cgroup{service_cgroup}/cgroup.procs"
    join = ("sh", "-c", f"mount -t cgroup2 none /sys/fs/cgroup && echo $$ > '{procs}' && exec \"$@\"", "sh")
    for host in (net.b4, net.b6):
        assert curl(net.a, host, SEEN, join) == 0
        assert curl(net.a, host, SEEN) != 0  # the same program outside the cgroup
        assert curl(net.a, host, UNSEEN, join) != 0


# ---------------------------------------------------------------- hostile text


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    path = tmp_path / "markers"
    path.mkdir()
    return path


def hostile_with_names_and_cgroups(markers: Path) -> list[Connection]:
    """The iptables injection set, plus hostile DNS names and cgroup paths."""
    connections = []
    for i, c in enumerate(hostile_connections(markers)):
        name = f'x";touch {markers}/N{i}";"\n}}\ntable ip evil {{ }}' if i % 2 else f"$(touch {markers}/M).example"
        cgroup = f'/ea"; touch {markers}/C{i}' if i % 3 else None
        process = dataclasses.replace(c.process, cgroup=cgroup, service=cgroup)
        connections.append(dataclasses.replace(c, hostname=name, process=process))
    return connections


@pytest.mark.parametrize("scope", ["none", "user", "cgroup"])
def test_hostile_names_inject_nothing(client_ns: Namespace, tmp_path: Path, markers: Path, scope: str) -> None:
    connections = hostile_with_names_and_cgroups(markers)
    flows = flows_of(connections)
    path = tmp_path / "rules.nft"
    path.write_text(render(flows, connections, "nftables:policy:drop", "nftables:verbose:2", f"nftables:scope:{scope}"))
    load(client_ns, path)
    assert_no_markers(markers)
    tables = [t for t in nft(client_ns, "list", "tables").stdout.splitlines() if t]
    assert tables == [f"table inet {TABLE}"]  # no table an injection made up

    expected: Counter[tuple[str, ...]] = Counter()
    for s in scoped_rules(flows, scope):
        r = s.rule
        values = [str(r.dst), r.protocol.name.lower(), str(r.dport)]
        if scope != "none":
            values.append(str(s.uid))
        expected[(*values, nft_comment(comment_text(r)))] += 1
    assert allowed_in_table(client_ns) == expected
    for key in expected:
        ipaddress.ip_address(key[0])  # every element is a real destination
