"""One audited command (`egress-auditor trace -- CMD ARGS...`): run in a
cgroup of its own, as the user who called sudo, so that only the connections
of that command and its descendants are recorded.

The child joins the cgroup before it execs, so nothing it runs escapes; its
standard output goes to our standard error, keeping stdout for the rules.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from egress_auditor.attribution.cgroups import MOUNTINFO, AuditCgroup, cgroup2_mount
from egress_auditor.attribution.process import CgroupLookup
from egress_auditor.errors import AuditorError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class CommandError(AuditorError):
    """The command could not be started: 127 not found, 126 not executable (as sh says)."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@dataclass(frozen=True)
class Invoker:
    """Who the command runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None
    home: str | None


def invoking_user(environ: Mapping[str, str] | None = None) -> Invoker | None:
    """The user behind sudo (SUDO_UID/SUDO_GID) when we run as root through it; None otherwise."""
    env = os.environ if environ is None else environ
    if os.geteuid() != 0 or not env.get("SUDO_UID") or not env.get("SUDO_GID"):
        return None
    try:
        uid, gid = int(env["SUDO_UID"]), int(env["SUDO_GID"])
    except ValueError:
        return None
    if uid == 0:
        return None
    try:
        entry = pwd.getpwuid(uid)
        name, home = entry.pw_name, entry.pw_dir
        groups = tuple(os.getgrouplist(name, gid))
    except KeyError:
        name, home, groups = None, None, (gid,)
    return Invoker(uid, gid, groups, name, home)


def own_cgroup(root: Path) -> Path:
    """This process's cgroup v2 directory (where leftovers of the command go back to)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                candidate = root / line[3:].lstrip("/")
                if (candidate / "cgroup.procs").exists():
                    return candidate
    except OSError:
        pass
    return root


class AuditedCommand:
    """The command, its cgroup, and whether a connection's cgroup is inside it."""

    def __init__(
        self,
        argv: Sequence[str],
        user: Invoker | None = None,
        cgroup_root: Path | None = None,
        stdout_fd: int = 2,
    ) -> None:
        if not argv:
            raise AuditorError("no command given after --")
        self.argv = list(argv)
        self.user = user
        self.cgroup_root = cgroup_root
        self.stdout_fd = stdout_fd
        self.cgroup: AuditCgroup | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self.left_running = 0  # processes still in the cgroup when the command exited
        self._owned: OrderedDict[int, bool] = OrderedDict()

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else 0

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.user is not None and self.user.name:
            # As `sudo -u alice` would: the user's own home, so caches and configs are theirs.
            env.update(USER=self.user.name, LOGNAME=self.user.name)
            if self.user.home:
                env["HOME"] = self.user.home
        return env

    def prepare(self) -> AuditCgroup:
        """Create the command's cgroup (before the tracers load: they may filter on it)."""
        if self.cgroup is None:
            root = self.cgroup_root or cgroup2_mount()
            if root is None:
                raise AuditorError(
                    f"no cgroup v2 hierarchy in {MOUNTINFO} (needed to follow one command): "
                    "mount -t cgroup2 none /sys/fs/cgroup/unified"
                )
            self.cgroup = AuditCgroup.create(root)
            self._owned[self.cgroup.id] = True
        return self.cgroup

    def start(self, unblock: set[signal.Signals] | None = None) -> None:
        cgroup, user = self.prepare(), self.user

        def child_setup() -> None:
            # In the child, before exec: signals as the user expects, our cgroup, then the user's identity.
            if unblock:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, unblock)
            cgroup.join()
            if user is not None:
                os.setgroups(list(user.groups))
                os.setgid(user.gid)
                os.setuid(user.uid)

        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=self.stdout_fd,
                env=self._environment(),
                preexec_fn=child_setup,  # safe: the tracer starts no threads before this
                close_fds=True,
            )
        except FileNotFoundError:
            self.cleanup()
            raise CommandError(f"command not found: {self.argv[0]}", 127) from None
        except PermissionError:
            self.cleanup()
            raise CommandError(f"command not executable: {self.argv[0]}", 126) from None
        except (OSError, subprocess.SubprocessError) as exc:
            self.cleanup()
            raise CommandError(f"could not start {self.argv[0]}: {exc}", 126) from None

    def poll(self) -> int | None:
        """The command's exit status (128+N when signal N ended it), or None while it runs."""
        if self.popen is None:
            return None
        code = self.popen.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code

    def send(self, signum: int) -> None:
        if self.popen is not None and self.popen.returncode is None:
            try:
                os.kill(self.popen.pid, signum)
            except ProcessLookupError:
                pass

    def kill_all(self) -> None:
        """SIGKILL everything in the command's cgroup."""
        if self.cgroup is None:
            return
        try:
            (self.cgroup.path / "cgroup.kill").write_text("1\n")  # 5.14+: atomic, even against forks
            return
        except OSError:
            pass
        for pid in self.cgroup.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def owns(self, cgroup_id: int | None, cgroups: CgroupLookup) -> bool:
        """Whether a connection from cgroup `cgroup_id` came from the command or its descendants."""
        if self.cgroup is None or not cgroup_id:
            return False
        known = self._owned.get(cgroup_id)
        if known is None:
            known = self.cgroup.contains(cgroups.path(cgroup_id))
            self._owned[cgroup_id] = known
            if len(self._owned) > 4096:
                self._owned.popitem(last=False)
        return known

    def cleanup(self) -> None:
        """Remove the cgroup; what the command left running is moved back beside us."""
        if self.cgroup is not None:
            self.left_running = self.cgroup.remove(move_to=own_cgroup(self.cgroup.root))
            self.cgroup = None
