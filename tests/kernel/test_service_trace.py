"""What a trace run for days relies on, with the real tracer, real clients in
a namespace and real kills: secrets in command lines never reach an output."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from netns import Link

from kernel.test_trace_e2e import SEEN_PORT, Tracer, servers, start_tracer  # noqa: F401

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
