"""`egress-auditor trace -o json -o nftables` end to end: the real tracer sees
real clients in a namespace; the capture file is rotated and SIGHUP makes the
tracer reopen it (and go on tracing); the nft rules it prints pass what was
seen and block the rest inside the namespace; and `rules --from` the two
capture files rebuilds the same ruleset."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
from netns import Link

from egress_auditor.capture.records import schema
from kernel.test_nftables_netns import ALSO_SEEN, SEEN, UNSEEN, curl, load, python_client, servers  # noqa: F401

CONSOLE = Path(sys.executable).with_name("egress-auditor")
NFT_DROP = ("-o", "nftables", "-O", "nftables:policy:drop")
RUNNING_LINE = "egress-auditor is running... press ctrl-c to stop"
VALIDATOR = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())


def wait_for(condition, timeout: float, what) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.05)


def records(path: Path) -> list[dict]:
    text = path.read_text() if path.exists() else ""
    # Read while the tracer writes: only lines it has finished count.
    parsed = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    for record in parsed:
        VALIDATOR.validate(record)
    return parsed


def has_flow(path: Path, dst: str, port: int) -> bool:
    return any(r["type"] == "flow" and (r["dst"], r["dport"]) == (dst, port) for r in records(path))


def test_trace_json_rotation_and_nft_rules(servers: Link, tmp_path: Path) -> None:  # noqa: F811
    net = servers
    capture = tmp_path / "flows.jsonl"
    rotated = tmp_path / "flows.jsonl.1"
    tracer = subprocess.Popen(
        [str(CONSOLE), "trace", "--no-live", "-t", "60", "-o", "json", "-O", f"json:file:{capture}", *NFT_DROP],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr: list[str] = []
    running = threading.Event()

    def read_stderr() -> None:
        assert tracer.stderr is not None
        for line in tracer.stderr:
            stderr.append(line.rstrip("\n"))
            running.set() if line.startswith(RUNNING_LINE) else None

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert running.wait(60), stderr
        for port in (SEEN, ALSO_SEEN):
            assert curl(net.a, net.b4, port) == 0
        wait_for(
            lambda: has_flow(capture, net.b4, SEEN) and has_flow(capture, net.b4, ALSO_SEEN),
            30,
            lambda: f"v4 records: {[(r['dst'], r.get('dport')) for r in records(capture)]} {stderr}",
        )

        capture.rename(rotated)  # logrotate's move, then its SIGHUP
        tracer.send_signal(signal.SIGHUP)
        wait_for(capture.exists, 10, "the file to be reopened")
        assert tracer.poll() is None, "SIGHUP stopped the run"
        for port in (SEEN, ALSO_SEEN):
            assert curl(net.a, net.b6, port) == 0
        wait_for(lambda: has_flow(capture, net.b6, SEEN) and has_flow(capture, net.b6, ALSO_SEEN), 30, "v6 records")

        tracer.send_signal(signal.SIGINT)
        stdout, _ = tracer.communicate(timeout=60)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    reader.join(timeout=10)
    assert tracer.returncode == 0, stderr

    old, new = records(rotated), records(capture)
    assert {r["type"] for r in old} == {"flow"}  # the summary went to the new file
    assert has_flow(rotated, net.b4, SEEN) and not has_flow(rotated, net.b6, SEEN)
    assert new[-1]["type"] == "summary" and [r["type"] for r in new].count("summary") == 1
    assert {r["run"] for r in old + new} == {new[-1]["run"]}
    totals = {(t["dst"], t["dport"]) for t in new[-1]["totals"]}
    assert {(h, p) for h in (net.b4, net.b6) for p in (SEEN, ALSO_SEEN)} <= totals
    curl_record = next(r for r in old if (r["dst"], r["dport"]) == (net.b4, SEEN))
    assert curl_record["process"]["name"] == "curl" and curl_record["process"]["attribution"] != "name-only"

    # The printed nft rules, loaded in the client namespace: seen passes, unseen is blocked.
    rules = tmp_path / "rules.nft"
    rules.write_text(stdout)
    load(net.a, rules)
    net.a.run(["ip", "-6", "neigh", "flush", "all"])
    for host in (net.b4, net.b6):
        assert curl(net.a, host, SEEN) == 0 and python_client(net.a, host, ALSO_SEEN) == 0
        assert curl(net.a, host, UNSEEN) != 0 and python_client(net.a, host, UNSEEN) != 0

    # The two capture files rebuild the same ruleset (the header names the capture instead of the attach path).
    rebuilt = subprocess.run(
        [str(CONSOLE), "rules", "--from", str(rotated), "--from", str(capture), *NFT_DROP],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr

    def statements(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.lstrip().startswith("#")]

    assert statements(rebuilt.stdout) == statements(stdout)
