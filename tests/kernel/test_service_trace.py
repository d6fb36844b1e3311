"""What a trace run for days relies on, with the real tracer, real clients in
a namespace and real kills: secrets in command lines never reach an output;
snapshots (periodic, or on SIGUSR1) write rule files that load, and
checkpoints that a run killed with SIGKILL is resumed from, counts intact; a
full disk during a snapshot costs a note and nothing already written."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from netns import Link

from kernel.test_json_trace import CONSOLE, records, wait_for
from kernel.test_nftables_netns import load
from kernel.test_trace_e2e import SEEN_PORT, UNSEEN_PORT, Tracer, curl, servers, start_tracer  # noqa: F401

SECRET = "S3cretPassw0rd"


def test_a_password_on_the_command_line_reaches_no_output(
    start_tracer: Callable[..., Tracer],  # noqa: F811
    servers: Link,  # noqa: F811
    tmp_path: Path,
) -> None:
    net = servers
    capture, rules_dir = tmp_path / "flows.jsonl", tmp_path / "rules"
    tracer = start_tracer(
        ["trace", "--no-live", "-t", "60", "-o", "json", "-O", f"json:file:{capture}", "-o", "iptables",
         "-O", "iptables:verbose:2", "-O", f"iptables:dir:{rules_dir}"]
    )  # fmt: skip
    tracer.wait_running()
    url = f"http://{net.b4}:{SEEN_PORT}/"
    done = net.a.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "5", "-u", f"admin:{SECRET}", url], check=False)
    assert done.returncode == 0, done.stderr
    tracer.proc.send_signal(signal.SIGINT)
    finished = tracer.finish(60)
    assert finished.returncode == 0, finished.log

    json_text, rules_v4 = capture.read_text(), (rules_dir / "rules.v4").read_text()
    # The flow was seen, with curl's command line (so the check below is about a line that was written).
    assert f"curl -sS -o /dev/null --max-time 5 -u admin:*** {url}" in rules_v4, rules_v4
    assert f"-u admin:*** {url}" in finished.stdout, finished.stdout
    assert '"admin:***"' in json_text
    for text in (json_text, rules_v4, finished.stdout, "\n".join(finished.stderr)):
        assert SECRET not in text


def checkpoint_count(capture: Path, dst: str, port: int) -> int | None:
    """The count the last checkpoint in the capture gives the flow (None: no checkpoint holds it)."""
    found = None
    for record in records(capture):
        if record["type"] == "checkpoint":
            for totals in record["totals"]:
                if (totals["dst"], totals["dport"]) == (dst, port):
                    found = totals["connections"]
    return found


def rule_line(text: str, dst: str, port: int) -> str:
    lines = [line for line in text.splitlines() if f"TCP to {dst} port {port}:" in line]
    assert len(lines) == 1, text
    return lines[0]


def test_killed_after_a_snapshot_the_next_run_resumes_with_the_counts(
    start_tracer: Callable[..., Tracer],  # noqa: F811
    servers: Link,  # noqa: F811
    tmp_path: Path,
) -> None:
    net = servers
    capture, nft, rules_dir = tmp_path / "flows.jsonl", tmp_path / "egress.nft", tmp_path / "rules"
    first = start_tracer(
        ["trace", "--no-live", "--snapshot-every", "1s", "-o", "json", "-O", f"json:file:{capture}",
         "-o", "nftables", "-O", f"nftables:file:{nft}", "-o", "iptables", "-O", f"iptables:dir:{rules_dir}"]
    )  # fmt: skip
    first.wait_running()
    for _ in range(5):
        assert curl(net.a, net.b4, SEEN_PORT)[0] == 0
    wait_for(lambda: checkpoint_count(capture, net.b4, SEEN_PORT) == 5, 30, lambda: first.stderr[-5:])
    # The snapshot's rule files load for real, in the client namespace.
    assert "5 connection(s)" in rule_line(nft.read_text(), net.b4, SEEN_PORT)
    assert "5 connection(s)" in rule_line((rules_dir / "rules.v4").read_text(), net.b4, SEEN_PORT)
    load(net.a, nft)
    restore = net.a.run(["iptables-restore", "--test", str(rules_dir / "rules.v4")], check=False)
    assert restore.returncode == 0, restore.stderr

    first.proc.kill()  # SIGKILL: no summary, no final write
    first.proc.wait()
    assert "summary" not in {r["type"] for r in records(capture)}

    second = start_tracer(
        ["trace", "--no-live", "--resume", str(capture), "-o", "json", "-O", f"json:file:{capture}",
         "-o", "iptables", "-O", "iptables:verbose:1"]
    )  # fmt: skip
    second.wait_running()
    for _ in range(3):
        assert curl(net.a, net.b4, SEEN_PORT)[0] == 0
    wait_for(
        lambda: len({r["run"] for r in records(capture) if r["type"] == "flow"}) == 2, 30, "the second run's record"
    )
    second.proc.send_signal(signal.SIGINT)
    finished = second.finish(60)
    assert finished.returncode == 0, finished.log
    assert any("counts as of its last checkpoint" in line for line in finished.stderr), finished.log
    assert "8 connection(s)" in rule_line(finished.stdout, net.b4, SEEN_PORT)
    # The file both runs appended to gives the same count, each connect once.
    rebuilt = subprocess.run(
        [str(CONSOLE), "rules", "--from", str(capture)], capture_output=True, text=True, timeout=60
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "8 connection(s)" in rule_line(rebuilt.stdout, net.b4, SEEN_PORT)


def notes_and_tail(tracer: Tracer) -> list[str]:
    return [line for line in tracer.stderr if "not written" in line or "failed" in line][-3:] + tracer.stderr[-3:]


def fill(directory: Path) -> Path:
    """Write zeros until the file system is full."""
    filler = directory / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_during_snapshots_costs_a_note_and_nothing_written(
    start_tracer: Callable[..., Tracer],  # noqa: F811
    servers: Link,  # noqa: F811
    tmp_path: Path,
) -> None:
    net = servers
    state = tmp_path / "state"
    state.mkdir()
    # Room for the records of every flow on the host (the tracer sees other tests' too) until it is filled.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(state)], check=True)
    try:
        capture, nft, rules_v4 = state / "flows.jsonl", state / "egress.nft", state / "rules" / "rules.v4"
        tracer = start_tracer(
            ["trace", "--no-live", "--snapshot-every", "1s", "-o", "json", "-O", f"json:file:{capture}",
             "-o", "nftables", "-O", f"nftables:file:{nft}", "-o", "iptables", "-O", f"iptables:dir:{state / 'rules'}"]
        )  # fmt: skip
        tracer.wait_running()
        assert curl(net.a, net.b4, SEEN_PORT)[0] == 0
        wait_for(lambda: checkpoint_count(capture, net.b4, SEEN_PORT) == 1, 30, lambda: notes_and_tail(tracer))
        wait_for(lambda: rules_v4.exists() and f"port {SEEN_PORT}:" in rules_v4.read_text(), 30, "rules.v4")
        before = {p: p.read_text() for p in (nft, rules_v4)}
        lines_before = len(records(capture))

        filler = fill(state)
        assert curl(net.a, net.b4, UNSEEN_PORT)[0] == 0
        wait_for(
            lambda: sum("snapshot of output iptables not written" in line for line in tracer.stderr) >= 2,
            30,
            lambda: notes_and_tail(tracer),
        )
        notes = [line for line in tracer.stderr if "not written" in line or "failed" in line]
        assert all("No space left on device" in line for line in notes), notes
        # What the last snapshot wrote is still there, whole; no temporary file is left behind.
        assert {p: p.read_text() for p in (nft, rules_v4)} == before
        assert len(records(capture)) >= lines_before  # every line still a whole record (records() parses each)
        assert not [p.name for p in state.rglob(".*")]

        filler.unlink()
        wait_for(lambda: f"port {UNSEEN_PORT}:" in rules_v4.read_text(), 30, "a snapshot once there is room")
        tracer.proc.send_signal(signal.SIGINT)
        finished = tracer.finish(60)
        assert finished.returncode == 0, finished.log
        summary = records(capture)[-1]
        assert summary["type"] == "summary"
        assert {(net.b4, SEEN_PORT), (net.b4, UNSEEN_PORT)} <= {(t["dst"], t["dport"]) for t in summary["totals"]}
        assert f"port {UNSEEN_PORT}:" in finished.stdout
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_sigusr1_writes_a_snapshot_at_once(
    start_tracer: Callable[..., Tracer],  # noqa: F811
    servers: Link,  # noqa: F811
    tmp_path: Path,
) -> None:
    net = servers
    nft = tmp_path / "egress.nft"
    tracer = start_tracer(["trace", "--no-live", "-t", "120", "-o", "nftables", "-O", f"nftables:file:{nft}"])
    tracer.wait_running()
    assert curl(net.a, net.b4, SEEN_PORT)[0] == 0
    wait_for(lambda: any(f"{net.b4}:{SEEN_PORT}" in line for line in tracer.stderr), 30, "the flow")
    assert not nft.exists()  # no --snapshot-every: nothing is written before a signal asks
    tracer.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: nft.exists() and f"port {SEEN_PORT}:" in nft.read_text(), 30, lambda: notes_and_tail(tracer))
    load(net.a, nft)
    assert tracer.proc.poll() is None  # the run goes on
    tracer.proc.send_signal(signal.SIGINT)
    finished = tracer.finish(60)
    assert finished.returncode == 0, finished.log
    assert f"port {SEEN_PORT}:" in finished.stdout
