"""Names and uids read from the task through the kernel's BTF (task_fields.py,
bpf/flow_map.bpf.c: fill_key_identity) against what the helpers give: the
real BTF, real programs loaded, real connects from processes that named
themselves, as root and as nobody."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from netns import Link

from egress_auditor.host import facts
from egress_auditor.host.btf import TASK_COMM_LEN, task_fields
from egress_auditor.inputs import ebpf
from egress_auditor.inputs.ebpf import PLUGIN, EbpfInput, bpf_source_dir

NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
BASE_PORT = 18300  # one closed port per name: a refused connect is a connect all the same
BPF_PROG_TEST_RUN = 10

# Each process sets its name with prctl(PR_SET_NAME): hostile bytes, every length up to and past 15.
NAMES: list[bytes] = [
    b"",
    b"a",
    b"seven77",
    b"eight888",
    b"nine99999",
    b"fifteen-bytes15",
    b"sixteen-bytes-16",
    b"new\nline",
    b"\x1b[31mred",
    b"\xff\xfe raw",
    b"tab\there;rm -f",
]

# Sets its name (first a long one, so a shorter one overwrites it), connects once, says who it was.
NAMED_CLIENT = r"""
import ctypes, json, os, socket, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None)
libc.prctl(15, b"x" * 15, 0, 0, 0)  # PR_SET_NAME
libc.prctl(15, bytes.fromhex(spec["name"]), 0, 0, 0)
s = socket.socket()
s.settimeout(5)
try:
    s.connect((spec["host"], spec["port"]))
except OSError:
    pass
s.close()
with open("/proc/self/comm", "rb") as f:
    comm = f.read()[:-1]
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "comm": comm.hex()}))
"""


def test_task_fields_are_the_offsets_bpftool_reads_from_the_kernel_btf() -> None:
    fields = task_fields_or_fail()
    dump = subprocess.run(
        ["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    task = struct_members(dump, "task_struct")
    cred = struct_members(dump, "cred")
    assert (fields.comm, fields.cred) == (task["comm"], task["cred"])
    assert (fields.uid, fields.gid) == (cred["uid"], cred["gid"])


def struct_members(dump: str, name: str) -> dict[str, int]:
    """Byte offsets of a struct's members in bpftool's raw BTF dump."""
    lines = dump.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\[\d+\] STRUCT '{name}' size=", line))
    members = {}
    for line in lines[start + 1 :]:
        found = re.match(r"\s+'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
        if not found:
            break
        members[found.group(1)] = int(found.group(2)) // 8
    return members


def test_the_name_is_cut_at_its_first_nul_and_zero_after_it_whatever_follows() -> None:
    """The kernel pads names with zeros, so no real process shows what follows a NUL: the name code
    itself runs here (BPF_PROG_TEST_RUN) on words with bytes after their NUL, at every position."""
    from bcc import BPF

    src = bpf_source_dir()
    text = '#include "task_name.bpf.h"\n' + NAME_TEST_PROGRAM
    bpf = BPF(text=text, cflags=[f"-I{src}", "-DEA_USE_RINGBUF", *task_fields_or_fail().cflags()])
    try:
        fn = bpf.load_func(b"name_test", BPF.RAW_TRACEPOINT)
        cases = [bytes([0x41 + i for i in range(16)])]  # no NUL at all: 15 bytes are kept
        for nul in range(16):
            cases.append(bytes(0x61 + i for i in range(nul)) + b"\0" + b"\xff" * (15 - nul))
            cases.append(b"\x01" * nul + b"\0" + b"\x01" * (15 - nul))  # the zero-byte test's false flags
        for raw in cases:
            args = (ctypes.c_uint64 * 2)(int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little"))
            fields = [fn.fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, ctypes.sizeof(args), 0]  # a raw tracepoint runs once
            address = ctypes.addressof(args)
            facts.bpf_syscall(BPF_PROG_TEST_RUN, [*fields, address & 0xFFFFFFFF, address >> 32])
            table = bpf["name_out"]
            got = b"".join(table[table.Key(i)].value.to_bytes(8, "little") for i in range(2))
            expected = raw.split(b"\0", 1)[0][: TASK_COMM_LEN - 1].ljust(TASK_COMM_LEN, b"\0")
            assert got == expected, raw
    finally:
        bpf.cleanup()


NAME_TEST_PROGRAM = r"""
BPF_ARRAY(name_out, u64, 2);
int name_test(struct bpf_raw_tracepoint_args *ctx)
{
    char comm[16];
    task_name(ctx->args[0], ctx->args[1], comm);
    int head = 0, tail = 1;
    name_out.update(&head, (u64 *)&comm[0]);
    name_out.update(&tail, (u64 *)&comm[8]);
    return 0;
}
"""


def task_fields_or_fail() -> Any:
    fields = task_fields()
    assert fields is not None, "this kernel has BTF: the offsets must be found"
    return fields


@pytest.fixture
def both_builds(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], tuple[EbpfInput, EbpfInput]]]:
    opened: list[EbpfInput] = []

    def open_both() -> tuple[EbpfInput, EbpfInput]:
        from_task = EbpfInput(PLUGIN.defaults())
        opened.append(from_task)
        from_task.open()
        with monkeypatch.context() as patch:
            patch.setattr(ebpf.build, "identity_flags", lambda: [])
            by_helpers = EbpfInput(PLUGIN.defaults())
            opened.append(by_helpers)
            by_helpers.open()
        return from_task, by_helpers

    yield open_both
    for source in opened:
        source.close()


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root", "nobody"])
def test_flow_keys_read_from_the_task_are_those_the_helpers_give(
    both_builds: Callable[[], tuple[EbpfInput, EbpfInput]], net: Link, as_nobody: bool
) -> None:
    from_task, by_helpers = both_builds()
    assert from_task.identity_from_task, "this kernel lets cgroup programs read the task through BTF"
    assert not by_helpers.identity_from_task
    clients = []
    for i, name in enumerate(NAMES):
        spec = {"name": name.hex(), "host": net.b4, "port": BASE_PORT + i}
        done = net.a.run([*(NOBODY if as_nobody else ()), sys.executable, "-c", NAMED_CLIENT, json.dumps(spec)])
        clients.append(json.loads(done.stdout))
    for i, client in enumerate(clients):
        expected = bytes.fromhex(client["comm"]).ljust(TASK_COMM_LEN, b"\0")
        assert expected[:-1] == NAMES[i][: TASK_COMM_LEN - 1].ljust(TASK_COMM_LEN - 1, b"\0")
        keys = [flow_key(source, net.b4, BASE_PORT + i) for source in (from_task, by_helpers)]
        assert keys[0] == keys[1] == (expected, client["uid"]), NAMES[i]
    assert {c["uid"] for c in clients} == {65534 if as_nobody else 0}


def flow_key(source: EbpfInput, dst: str, port: int) -> tuple[bytes, int]:
    """The kernel flow map's key for this destination (exactly one): its raw name bytes and uid."""
    assert source.bpf is not None
    address = ipaddress.ip_address(dst).packed
    keys = [k for k in source.bpf["flows"].keys() if bytes(k.daddr)[:4] == address and k.dport == port]
    assert len(keys) == 1, f"{len(keys)} flows to {dst} port {port}"
    at = type(keys[0]).comm.offset  # the field itself reads as bytes cut at the NUL
    return bytes(keys[0])[at : at + TASK_COMM_LEN], keys[0].uid


def test_a_kernel_that_refuses_the_task_reads_gets_the_helpers(monkeypatch: pytest.MonkeyPatch, net: Link) -> None:
    """A cred offset at the name (not a pointer) stands in for a kernel whose verifier refuses the
    reads: the programs are built again with the helpers, and connects are still counted by name."""
    fields = task_fields_or_fail()
    refused = fields._replace(cred=fields.comm).cflags()
    monkeypatch.setattr(ebpf.build, "identity_flags", lambda: refused)
    source = EbpfInput(PLUGIN.defaults())
    try:
        attached = source.open()
        assert not source.identity_from_task
        assert "names and uids read by helpers" in attached
        spec = {"name": b"fallback".hex(), "host": net.b4, "port": BASE_PORT}
        client = json.loads(net.a.run([sys.executable, "-c", NAMED_CLIENT, json.dumps(spec)]).stdout)
        assert flow_key(source, net.b4, BASE_PORT) == (b"fallback".ljust(TASK_COMM_LEN, b"\0"), client["uid"])
    finally:
        source.close()
