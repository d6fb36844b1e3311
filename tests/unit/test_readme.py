"""The README's quick start works as typed by root on a host without sudo (a fresh
container or minimal VM), and tells a user account how to get there."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start() -> str:
    text = README.read_text()
    start = text.index("## Quick start")
    return text[start : text.index("\n## ", start + 1)]


def test_the_quick_start_commands_run_as_root_without_sudo() -> None:
    section = quick_start()
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    commands = [c.strip() for block in blocks for line in block.splitlines() for c in line.split("&&")]
    assert commands == ["scripts/setup.sh", "egress-auditor trace --duration 60", "scripts/test.sh"]
    # Said plainly, with the way in from a user account that keeps the checkout as the directory.
    assert "run as root" in section and "`sudo -s`" in section
    assert not re.search(r"`sudo (?!-s`)", section), "a command in the quick start needs sudo"
