"""What the iptables and nftables outputs share: the comment lines above a
rule and writing a rules file that readers never see half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from egress_auditor.escape import comment_line
from egress_auditor.rules.provenance import rule_lines
from egress_auditor.rules.scope import ScopedRule


def rule_comments(scoped: ScopedRule, verbose: int, indent: str = "") -> list[str]:
    """The `#` lines above a rule (provenance.rule_lines), escaped for a comment line."""
    lines = rule_lines(scoped.rule, verbose)
    if scoped.note:
        lines.append(f"  {scoped.note}")
    return [f"{indent}# {comment_line(line)}" for line in lines]


def write_atomically(path: Path, text: str) -> None:
    """Readers (iptables-persistent or nftables.service at boot) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
