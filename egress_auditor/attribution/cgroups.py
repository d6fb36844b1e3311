"""cgroup v2: from the id the kernel gives (bpf_get_current_cgroup_id) to the
path in the hierarchy, and from the path to the systemd unit or container.

The v2 hierarchy is found in /proc/self/mountinfo: /sys/fs/cgroup on most
distributions, /sys/fs/cgroup/unified on hybrid layouts. An id is the inode
number of the cgroup's directory; it is turned into a path with
open_by_handle_at (exact, needs CAP_DAC_READ_SEARCH) or by walking the tree.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from egress_auditor.errors import AuditorError

MOUNTINFO = Path("/proc/self/mountinfo")
FILEID_KERNFS = 0xFE  # the file handle type cgroupfs hands out: its 8 bytes are the cgroup id
# A cgroup id that matches no directory: walk the tree again at most this often.
WALK_INTERVAL_S = 1.0
AUDIT_CGROUP_PREFIX = "egress-auditor-"  # the transient cgroups of `trace -- CMD`, under the root


def _unescape_mountinfo(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def cgroup2_mount(mountinfo: str | None = None) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (its root, not a bind of a subtree)."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    fallback: Path | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        if len(fields) < 5 or not right.split() or right.split()[0] != "cgroup2":
            continue
        root, point = _unescape_mountinfo(fields[3]), Path(_unescape_mountinfo(fields[4]))
        if root == "/":
            return point
        fallback = fallback or point  # inside a cgroup namespace the root shows as a sub-path
    return fallback


# -- a hierarchy hidden by `ip netns exec` ----------------------------------------

CLONE_NEWNS = 0x00020000
MS_REC, MS_SLAVE = 0x4000, 0x80000
MNT_DETACH = 2
# Where a private mount goes: the hybrid layout's place if /sys has it, else the usual one.
PRIVATE_CGROUP2_TARGETS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


def _empty_directory(path: Path) -> bool:
    try:
        return path.is_dir() and not any(path.iterdir())
    except OSError:
        return False


@contextmanager
def cgroup2_where_hidden() -> Iterator[Path | None]:
    """Where no cgroup v2 hierarchy is mounted (`ip netns exec` mounts a /sys of its own), mount
    one in a mount namespace of this process's own, for the run only: no other process sees it,
    and it is unmounted at the end. Yields the mount point, or None where nothing was mounted
    (already mounted, not root, or the kernel refused)."""
    if cgroup2_mount() is not None or os.geteuid() != 0:
        yield None
        return
    target = next((t for t in PRIVATE_CGROUP2_TARGETS if _empty_directory(t)), None)
    libc = ctypes.CDLL(None, use_errno=True)
    # Slave: mounts made here never reach the namespace this one is copied from.
    if (
        target is None
        or libc.unshare(CLONE_NEWNS) != 0
        or libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0
        or libc.mount(b"cgroup2", str(target).encode(), b"cgroup2", 0, None) != 0
    ):
        yield None
        return
    try:
        yield target
    finally:
        libc.umount2(str(target).encode(), MNT_DETACH)


# -- path -> service ------------------------------------------------------------

_HEX_ID = re.compile(r"[0-9a-f]{64}")
# systemd-driver scopes of container runtimes: runtime label, pattern of the cgroup's name.
_RUNTIME_SCOPES = (
    ("docker", re.compile(r"^docker-([0-9a-f]{64})\.scope$")),
    ("podman", re.compile(r"^libpod-(?:conmon-)?([0-9a-f]{64})(?:\.scope)?$")),
    ("containerd", re.compile(r"^cri-containerd-([0-9a-f]{64})\.scope$")),
    ("cri-o", re.compile(r"^crio-(?:conmon-)?([0-9a-f]{64})\.scope$")),
)
# cgroupfs-driver layouts: the runtime's directory, then the container's 64-hex id.
_RUNTIME_DIRS = {"docker": "docker", "libpod_parent": "podman", "lxc": "lxc", "lxc.payload": "lxc"}
_POD = re.compile(r"^(?:kubepods-(?:besteffort-|burstable-)?)?pod([0-9a-f_-]{36})(?:\.slice)?$")
_UNIT_SUFFIXES = (".service", ".scope")


def _container(part: str, parent: str, in_pod: bool) -> str | None:
    for runtime, pattern in _RUNTIME_SCOPES:
        found = pattern.match(part)
        if found:
            return f"{runtime}:{found.group(1)[:12]}"
    if part.startswith("lxc.payload."):
        return "lxc:" + part[len("lxc.payload.") :]
    runtime = _RUNTIME_DIRS.get(parent)
    if runtime == "lxc":
        return f"lxc:{part}"
    if _HEX_ID.fullmatch(part) and (runtime or in_pod):
        return f"{runtime or 'container'}:{part[:12]}"
    return None


def service_of(path: str | None) -> str | None:
    """What a cgroup v2 path belongs to: the container (`docker:0123456789ab`,
    `kubepods:pod<uid>/containerd:0123456789ab`), then the innermost systemd
    unit below it (`nginx.service`, `user@1000.service`, `session-3.scope`).
    None for the root and for paths that name neither."""
    if not path:
        return None
    parts = [p for p in path.split("/") if p]
    labels: list[str] = []
    unit = None
    for i, part in enumerate(parts):
        pod = _POD.match(part)
        if pod and any(p.startswith("kubepods") for p in parts[:i]):
            labels.append("kubepods:pod" + pod.group(1).replace("_", "-"))
            unit = None
            continue
        container = _container(part, parts[i - 1] if i else "", any(x.startswith("kubepods:") for x in labels))
        if container:
            labels.append(container)
            unit = None  # units above a container (system.slice) say less than the container
        elif part.endswith(_UNIT_SUFFIXES):
            unit = part
    if unit:
        labels.append(unit)
    return "/".join(labels) or None


# -- id -> path -----------------------------------------------------------------


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 8)]


class CgroupResolver:
    """cgroup id -> path relative to the v2 root ("/system.slice/nginx.service"), cached and bounded."""

    def __init__(self, root: Path | None = None, max_entries: int = 4096) -> None:
        self.root = root if root is not None else cgroup2_mount()
        self._cache: OrderedDict[int, str | None] = OrderedDict()
        self._max = max_entries
        self._walked = 0.0
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._mount_fd: int | None = None

    def path(self, cgroup_id: int) -> str | None:
        if cgroup_id <= 0 or self.root is None:
            return None
        if cgroup_id in self._cache:
            self._cache.move_to_end(cgroup_id)
            return self._cache[cgroup_id]
        found = self._by_handle(cgroup_id)
        if found is None:
            found, walked = self._by_walk(cgroup_id)
            if found is None and not walked:
                return None  # not looked for yet (walks are paced): ask again later
        self._remember(cgroup_id, found)
        return found

    def service(self, cgroup_id: int) -> str | None:
        return service_of(self.path(cgroup_id))

    def _remember(self, cgroup_id: int, path: str | None) -> None:
        self._cache[cgroup_id] = path
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)

    def _relative(self, absolute: str) -> str | None:
        assert self.root is not None
        try:
            rel = Path(absolute).relative_to(self.root)
        except ValueError:
            return None
        return "/" + str(rel) if str(rel) != "." else "/"

    def _by_handle(self, cgroup_id: int) -> str | None:
        """Exact and O(1): the kernel opens the cgroup directory from its id."""
        assert self.root is not None
        try:
            if self._mount_fd is None:
                self._mount_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        handle = _FileHandle(8, FILEID_KERNFS, (ctypes.c_ubyte * 8)(*cgroup_id.to_bytes(8, "little")))
        fd = self._libc.open_by_handle_at(self._mount_fd, ctypes.byref(handle), os.O_RDONLY | os.O_DIRECTORY)
        if fd < 0:
            return None
        try:
            return self._relative(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return None
        finally:
            os.close(fd)

    def _by_walk(self, cgroup_id: int) -> tuple[str | None, bool]:
        """Without CAP_DAC_READ_SEARCH: the id is the directory's inode number.
        Returns the path and whether the tree was walked (at most once a second)."""
        assert self.root is not None
        if time.monotonic() - self._walked < WALK_INTERVAL_S:
            return None, False
        self._walked = time.monotonic()
        found = None
        for directory, _subdirs, _files in os.walk(self.root):
            try:
                ino = os.stat(directory).st_ino
            except OSError:
                continue
            rel = self._relative(directory)
            if rel is not None and len(self._cache) < self._max:
                self._cache.setdefault(ino, rel)
            if ino == cgroup_id:
                found = rel
        return found, True

    def close(self) -> None:
        if self._mount_fd is not None:
            os.close(self._mount_fd)
            self._mount_fd = None


def cgroup_id(path: Path) -> int:
    """The id the kernel reports for the cgroup at `path` (its inode number)."""
    return os.stat(path).st_ino


@dataclass
class AuditCgroup:
    """A cgroup of its own for an audited command: made under the v2 root,
    removed afterwards (processes still in it are moved out first)."""

    path: Path
    id: int
    root: Path

    @classmethod
    def create(cls, root: Path | None = None) -> AuditCgroup:
        root = root if root is not None else cgroup2_mount()
        if root is None:
            raise AuditorError(
                "no cgroup v2 hierarchy is mounted (needed to follow one command): "
                "mount -t cgroup2 none /sys/fs/cgroup/unified"
            )
        path = root / f"{AUDIT_CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        try:
            path.mkdir(mode=0o755)
        except OSError as exc:
            raise AuditorError(f"could not create the command's cgroup {path}: {exc.strerror}") from exc
        return cls(path=path, id=cgroup_id(path), root=root)

    @property
    def relative(self) -> str:
        return "/" + str(self.path.relative_to(self.root))

    @property
    def depth(self) -> int:
        """Its level below the root (the root is 0), as bpf_get_current_ancestor_cgroup_id counts."""
        return len(self.path.relative_to(self.root).parts)

    def join(self) -> None:
        """Move the calling process into this cgroup (for the child, before exec)."""
        with open(self.path / "cgroup.procs", "w") as procs:
            procs.write("0\n")

    def pids(self) -> list[int]:
        found: list[int] = []
        for directory, _subdirs, _files in os.walk(self.path):
            try:
                found.extend(int(p) for p in Path(directory, "cgroup.procs").read_text().split())
            except OSError:
                continue
        return found

    def contains(self, cgroup_path: str | None) -> bool:
        """Whether a cgroup path (relative to the root) is this cgroup or below it."""
        if cgroup_path is None:
            return False
        mine = self.relative
        return cgroup_path == mine or cgroup_path.startswith(mine + "/")

    def remove(self, move_to: Path | None = None) -> int:
        """Move what still runs here to `move_to` (the root by default) and remove
        the cgroup and any below it; returns how many processes were moved."""
        target = (move_to or self.root) / "cgroup.procs"
        moved = 0
        for _attempt in range(10):
            left = self.pids()
            if not left:
                break
            for pid in left:
                try:
                    target.write_text(f"{pid}\n")
                    moved += 1
                except OSError:
                    pass  # it exited meanwhile
        for directory, _subdirs, _files in sorted(os.walk(self.path), key=lambda w: -len(w[0])):
            for _attempt in range(50):
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)  # a process that just exited is released a moment later
        return moved
