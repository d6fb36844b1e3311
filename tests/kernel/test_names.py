"""Names behind addresses in the rules of `trace -- CMD`: a real curl in a client
namespace resolves a name through dnsmasq in a server namespace, then connects
to an HTTP server there; the rule of that destination must say the name, every
time, though the DNS answer and the connect arrive in two ring buffers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dnsserver import dnsmasq, resolv_conf
from netns import Link, http_server

from egress_auditor.errors import AuditorError
from egress_auditor.inputs import ebpf

EGRESS_AUDITOR = str(Path(sys.executable).with_name("egress-auditor"))
HTTP_PORT = 18093
NAME = "names.example.test"
# A short command's answer and connect come within a millisecond: one run in four or so lost the
# name when the DNS ring was read a poll after the connect. 16 runs catch that nearly always.
RUNS = 16


def traced_curl(net: Link, options: list[str]) -> subprocess.CompletedProcess:
    """trace -- curl http://NAME:PORT/, curl resolving through the namespace's resolv.conf."""
    curl = ["curl", "-sS", "-o", "/dev/null", "--retry", "3", f"http://{NAME}:{HTTP_PORT}/"]
    return subprocess.run(
        [EGRESS_AUDITOR, "trace", "--no-live", *options, "--", *net.a.cmd(curl)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def rule_block(rules: str, dst: str, port: int) -> list[str]:
    """The `#` lines and rule of one destination."""
    blocks = rules.split("\n# TCP to ")
    found = [b for b in blocks if b.startswith(f"{dst} port {port}:")]
    assert len(found) == 1, rules
    return found[0].splitlines()


def test_a_short_commands_destination_is_named_every_time(net: Link) -> None:
    with dnsmasq(net.b, [net.b4], [f"--host-record={NAME},{net.b4}"]), http_server(net.b, HTTP_PORT):
        with resolv_conf(net.a, [net.b4]):
            unnamed = []
            for run in range(RUNS):
                result = traced_curl(net, ["-I", "ebpf:dns:on"])
                assert result.returncode == 0, result.stderr
                block = rule_block(result.stdout, net.b4, HTTP_PORT)
                if f"#   asked for as: {NAME}" not in block:
                    unnamed.append((run, block))
    assert unnamed == []


def test_names_are_on_by_default(net: Link) -> None:
    with dnsmasq(net.b, [net.b4], [f"--host-record={NAME},{net.b4}"]), http_server(net.b, HTTP_PORT):
        with resolv_conf(net.a, [net.b4]):
            result = traced_curl(net, [])
    assert result.returncode == 0, result.stderr
    assert "DNS answers: cgroup_skb ingress" in result.stderr
    assert f"#   asked for as: {NAME}" in rule_block(result.stdout, net.b4, HTTP_PORT)


def test_names_by_default_give_way_to_a_one_line_note_where_their_program_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This kernel loads the DNS program, so a copy of bpf/ whose DNS program cannot be built
    stands in for one that refuses it; everything else is the real build, loaded and attached."""
    src = tmp_path / "bpf"
    shutil.copytree(ebpf.bpf_source_dir(), src)
    with (src / "dns.bpf.c").open("a") as handle:
        handle.write("\n#error no DNS program on this kernel\n")
    monkeypatch.setattr(ebpf.build, "bpf_source_dir", lambda: src)
    source = ebpf.EbpfInput(ebpf.PLUGIN.defaults())
    try:
        described = source.open()
        assert source.plan is not None and not source.plan.dns
        assert "no DNS names: their program did not load" in described
        assert "DNS answers" not in described and "TCP: cgroup connect4/6 hooks" in described
        assert "\n" not in described
    finally:
        source.close()
    with pytest.raises(AuditorError, match="could not load the BPF programs"):
        ebpf.EbpfInput(ebpf.PLUGIN.defaults() | {"dns": "on"}).open()
