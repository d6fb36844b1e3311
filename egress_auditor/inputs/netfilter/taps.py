"""The firewall rules the netfilter inputs install for `setup:auto`, and their removal.

Every rule carries a tag naming its run: `egress-auditor nflog pid=1234 start=5678`
(a comment in iptables, the table name and a comment in nft). The start time
(clock ticks since boot, /proc/PID/stat) tells a live run from a dead one
whose PID was reused, so a run removes what a killed run left behind and never
what a running one uses.

Only new connections reach the target: TCP SYN (without ACK) in conntrack
state NEW, and UDP in state NEW; IPv4 and IPv6.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from egress_auditor.errors import AuditorError

TAG = "egress-auditor"
_TAG_RE = re.compile(r"egress-auditor (nflog|nfqueue) pid=(\d+) start=(\d+)")
_TABLE_RE = re.compile(r"^table inet (egress_auditor_(nflog|nfqueue)_(\d+)_(\d+))\s*$")
IPTABLES_TABLE = "mangle"  # before filter: every attempt is seen, even one the filter table drops
NFT_PRIORITY = -150  # the mangle priority, after conntrack (-200) so `ct state` is known
# iptables-nft makes these tables; any other nft table means the host writes nft rules itself.
_IPTABLES_NFT_TABLES = {"filter", "nat", "mangle", "raw", "security"}
_MATCHES = (
    ("-p", "tcp", "--syn", "-m", "conntrack", "--ctstate", "NEW"),
    ("-p", "udp", "-m", "conntrack", "--ctstate", "NEW"),
)
_NFT_MATCHES = (
    "meta l4proto tcp tcp flags & (fin | syn | rst | ack) == syn ct state new",
    "meta l4proto udp ct state new",
)
TIMEOUT_S = 20


def run_command(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def process_start(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the name may hold spaces and ')'
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Owner:
    """The run that installed a rule."""

    kind: str  # "nflog" or "nfqueue"
    pid: int
    start: int

    @classmethod
    def current(cls, kind: str) -> Owner:
        pid = os.getpid()
        return cls(kind, pid, process_start(pid) or 0)

    @property
    def comment(self) -> str:
        return f"{TAG} {self.kind} pid={self.pid} start={self.start}"

    @property
    def nft_table(self) -> str:
        return f"egress_auditor_{self.kind}_{self.pid}_{self.start}"

    def alive(self, proc: Path = Path("/proc")) -> bool:
        return process_start(self.pid, proc) == self.start

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        match = _TAG_RE.search(text)
        return cls(match.group(1), int(match.group(2)), int(match.group(3))) if match else None


@dataclass(frozen=True)
class Target:
    """Where the rules send new connections: an NFLOG group or an NFQUEUE queue."""

    kind: str  # "nflog" or "nfqueue"
    number: int

    def iptables_args(self) -> list[str]:
        if self.kind == "nflog":
            return ["-j", "NFLOG", "--nflog-group", str(self.number)]
        # --queue-bypass: with no program bound to the queue, packets pass instead of being dropped.
        return ["-j", "NFQUEUE", "--queue-num", str(self.number), "--queue-bypass"]

    def nft_statement(self) -> str:
        if self.kind == "nflog":
            return f"log group {self.number}"
        return f"queue num {self.number} bypass"


def iptables_commands(target: Target, owner: Owner) -> list[list[str]]:
    """The arguments after `iptables`/`ip6tables` that install the rules.

    NFLOG goes first in the chain so nothing before it hides a connection.
    NFQUEUE goes last: its ACCEPT verdict ends the chain, so it must not
    skip rules of the user's that come after it (the filter table still runs).
    """
    if target.kind == "nflog":
        where, matches = ["-I", "OUTPUT", "1"], list(reversed(_MATCHES))  # inserted in reverse: TCP ends up first
    else:
        where, matches = ["-A", "OUTPUT"], list(_MATCHES)
    tag = ["-m", "comment", "--comment", owner.comment]
    return [["-w", "5", "-t", IPTABLES_TABLE, *where, *m, *tag, *target.iptables_args()] for m in matches]


def nft_script(target: Target, owner: Owner) -> str:
    """One nft transaction: a table of our own, so removing it removes everything."""
    rules = "\n".join(f'    {m} {target.nft_statement()} comment "{owner.comment}"' for m in _NFT_MATCHES)
    return (
        f"table inet {owner.nft_table} {{\n"
        f"  chain output {{\n"
        f"    type filter hook output priority {NFT_PRIORITY}; policy accept;\n"
        f"{rules}\n"
        f"  }}\n"
        f"}}\n"
    )


def tagged_iptables_rules(save_lines: Sequence[str]) -> list[tuple[Owner, list[str]]]:
    """From `iptables -S` lines, each tagged rule's owner and the arguments that delete it."""
    found = []
    for line in save_lines:
        owner = Owner.parse(line)
        if owner is None or not line.startswith("-A "):
            continue
        found.append((owner, ["-D", *shlex.split(line)[1:]]))
    return found


def nft_tables(listing: str) -> list[tuple[Owner, str]]:
    """From `nft list tables`, each table of ours with its owner."""
    found = []
    for line in listing.splitlines():
        match = _TABLE_RE.match(line.strip())
        if match:
            found.append((Owner(match.group(2), int(match.group(3)), int(match.group(4))), match.group(1)))
    return found


def host_writes_nft(listing: str) -> bool:
    """Whether `nft list tables` shows tables that neither iptables-nft nor this tool made."""
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and not parts[2].startswith("egress_auditor_"):
            if parts[1] == "inet" or parts[1] == "netdev" or parts[2] not in _IPTABLES_NFT_TABLES:
                return True
    return False


class Firewall:
    """Installs one run's rules through iptables or nft, removes them, and clears dead runs' leftovers."""

    def __init__(self, target: Target, owner: Owner, runner: Callable[..., subprocess.CompletedProcess] = run_command):
        self.target = target
        self.owner = owner
        self.run = runner
        self.backend: str | None = None  # "iptables" or "nft" once installed

    # -- what the host has ------------------------------------------------------
    @staticmethod
    def iptables_binaries() -> list[str]:
        return [b for b in ("iptables", "ip6tables") if shutil.which(b)]

    def _nft_listing(self) -> str | None:
        if not shutil.which("nft"):
            return None
        done = self.run(["nft", "list", "tables"])
        return done.stdout if done.returncode == 0 else None

    # -- leftovers --------------------------------------------------------------
    def remove_leftovers(self) -> list[Owner]:
        """Remove tagged rules whose run is gone (killed with SIGKILL, or a crash); returns their owners."""
        removed: list[Owner] = []
        for binary in self.iptables_binaries():
            listing = self.run([binary, "-w", "5", "-t", IPTABLES_TABLE, "-S"])
            for owner, delete in tagged_iptables_rules(listing.stdout.splitlines()):
                if not owner.alive() and self.run([binary, "-w", "5", "-t", IPTABLES_TABLE, *delete]).returncode == 0:
                    removed.append(owner)
        for owner, table in nft_tables(self._nft_listing() or ""):
            if not owner.alive() and self.run(["nft", "delete", "table", "inet", table]).returncode == 0:
                removed.append(owner)
        return removed

    # -- install and remove -----------------------------------------------------
    def install(self, mode: str) -> str:
        """Install the rules; mode is auto, iptables or nft. Returns what was done, for the start-up line."""
        listing = self._nft_listing()
        binaries = self.iptables_binaries()
        if mode == "auto":
            prefer_nft = listing is not None and (host_writes_nft(listing) or len(binaries) < 2)
            order = ["nft", "iptables"] if prefer_nft else ["iptables", "nft"]
        else:
            order = [mode]
        problems = []
        for backend in order:
            problem = self._install_nft(listing) if backend == "nft" else self._install_iptables(binaries)
            if problem is None:
                self.backend = backend
                fallback = f" ({problems[0]})" if problems else ""
                return f"{self.describe()}{fallback}"
            problems.append(f"{backend}: {problem}")
        raise AuditorError(f"could not install the {self.target.kind} rules: {'; '.join(problems)}")

    def describe(self) -> str:
        if self.backend == "nft":
            return f"rules in nft table inet {self.owner.nft_table} ({self.target.nft_statement()})"
        verb = "NFLOG group" if self.target.kind == "nflog" else "NFQUEUE queue"
        return f"rules in iptables/ip6tables {IPTABLES_TABLE} OUTPUT ({verb} {self.target.number})"

    def _install_iptables(self, binaries: list[str]) -> str | None:
        if len(binaries) < 2:
            return "iptables and ip6tables are needed (apt-get install iptables)"
        for binary in binaries:
            for args in iptables_commands(self.target, self.owner):
                done = self.run([binary, *args])
                if done.returncode != 0:
                    self._remove_iptables()
                    return f"{binary}: {done.stderr.strip() or 'failed'}"
        return None

    def _install_nft(self, listing: str | None) -> str | None:
        if listing is None:
            return "nft is missing or cannot list the ruleset (apt-get install nftables)"
        done = self.run(["nft", "-f", "-"], stdin=nft_script(self.target, self.owner))
        if done.returncode != 0:
            self.run(["nft", "delete", "table", "inet", self.owner.nft_table])
            return done.stderr.strip().splitlines()[0] if done.stderr.strip() else "nft failed"
        return None

    def remove(self) -> int:
        """Remove this run's rules wherever they are; returns how many rules or tables went."""
        return self._remove_iptables() + self._remove_nft()

    def _remove_iptables(self) -> int:
        removed = 0
        for binary in self.iptables_binaries():
            listing = self.run([binary, "-w", "5", "-t", IPTABLES_TABLE, "-S"])
            for owner, delete in tagged_iptables_rules(listing.stdout.splitlines()):
                if owner == self.owner and self.run([binary, "-w", "5", "-t", IPTABLES_TABLE, *delete]).returncode == 0:
                    removed += 1
        return removed

    def _remove_nft(self) -> int:
        for owner, table in nft_tables(self._nft_listing() or ""):
            if owner == self.owner:
                return int(self.run(["nft", "delete", "table", "inet", table]).returncode == 0)
        return 0
