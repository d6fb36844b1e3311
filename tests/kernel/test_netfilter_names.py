"""DNS names with the netfilter inputs: the auditor runs `-i nflog` (or nfqueue) inside a client
namespace, the eBPF input's DNS program loaded alone beside it; a real curl there resolves a name
through dnsmasq in a server namespace and connects to an HTTP server there. The connection the
netfilter rule reports must carry the name, on the live line and in the rules."""

from __future__ import annotations

import pytest
from dnsserver import dnsmasq, resolv_conf
from netfilter_run import Auditor, curl, flow_line, start_auditor
from netns import Link, http_server

PORT = 18094
NAME = "nflog.example.test"


@pytest.mark.parametrize("input_name", ["nflog", "nfqueue"])
def test_a_curl_connection_is_named_after_the_dns_answer_it_followed(
    net: Link, auditors: list[Auditor], input_name: str
) -> None:
    ns = net.a
    with dnsmasq(net.b, [net.b4], [f"--host-record={NAME},{net.b4}"]), http_server(net.b, PORT):
        auditor = start_auditor(auditors, ns, input_name, "-I", f"{input_name}:setup:auto")
        assert "DNS answers: cgroup_skb ingress" in auditor.attach_line, auditor.stderr
        with resolv_conf(ns, [net.b4]):
            assert curl(ns, f"http://{NAME}:{PORT}/") == 0
        line = auditor.wait_line(flow_line(net.b4, PORT))
        # curl's socket may be gone before the packet is read (then `unknown`): the name is not.
        assert f"{net.b4}:{PORT} ({NAME}) by " in line, line
        assert auditor.stop() == 0
    assert f"#   asked for as: {NAME}" in auditor.stdout, auditor.stdout


def test_dns_off_leaves_addresses_unnamed(net: Link, auditors: list[Auditor]) -> None:
    ns = net.a
    with dnsmasq(net.b, [net.b4], [f"--host-record={NAME},{net.b4}"]), http_server(net.b, PORT):
        auditor = start_auditor(auditors, ns, "nflog", "-I", "nflog:setup:auto", "-I", "nflog:dns:off")
        assert "DNS" not in auditor.attach_line, auditor.stderr
        with resolv_conf(ns, [net.b4]):
            assert curl(ns, f"http://{NAME}:{PORT}/") == 0
        line = auditor.wait_line(flow_line(net.b4, PORT))
        assert NAME not in line, line
        assert auditor.stop() == 0
    assert NAME not in auditor.stdout
