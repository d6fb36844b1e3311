"""cgroup v2: finding the hierarchy, naming the service or container of a
path, resolving ids to paths, and what counts as inside a command's cgroup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from egress_auditor.attribution import cgroups
from egress_auditor.attribution.cgroups import AuditCgroup, CgroupResolver, cgroup2_mount, service_of

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
"""
UNIFIED = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
# A bind of a sub-tree first, the real root afterwards: the root wins.
BIND_THEN_ROOT = (
    "40 23 0:26 /system.slice /mnt/sys rw,relatime - cgroup2 cgroup2 rw\n"
    "41 23 0:26 / /mnt/my\\040cgroups rw,relatime - cgroup2 cgroup2 rw\n"
)
V1_ONLY = "33 31 0:28 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HYBRID, Path("/sys/fs/cgroup/unified")),
        (UNIFIED, Path("/sys/fs/cgroup")),
        (BIND_THEN_ROOT, Path("/mnt/my cgroups")),
        (V1_ONLY, None),
        ("", None),
    ],
)
def test_cgroup2_mount_is_found_in_mountinfo(text: str, expected: Path | None) -> None:
    assert cgroup2_mount(text) == expected


def test_cgroup2_mount_of_this_machine_holds_the_root_cgroup() -> None:
    root = cgroup2_mount()
    assert root is not None and (root / "cgroup.procs").exists()


HEX = "0123456789abcdef" * 4
POD = "12345678-1234-1234-1234-123456789abc"


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/", None),
        ("", None),
        (None, None),
        ("/system.slice", None),
        ("/system.slice/nginx.service", "nginx.service"),
        ("/init.scope", "init.scope"),
        ("/user.slice/user-1000.slice/user@1000.service/init.scope", "init.scope"),
        ("/user.slice/user-1000.slice/user@1000.service", "user@1000.service"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox.scope", "app-firefox.scope"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        (f"/system.slice/docker-{HEX}.scope", "docker:0123456789ab"),
        (f"/docker/{HEX}", "docker:0123456789ab"),
        (f"/machine.slice/libpod-{HEX}.scope/container", "podman:0123456789ab"),
        (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{HEX}.scope", "podman:0123456789ab"),
        (f"/system.slice/crio-{HEX}.scope", "cri-o:0123456789ab"),
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            + POD.replace("-", "_")
            + f".slice/cri-containerd-{HEX}.scope",
            f"kubepods:pod{POD}/containerd:0123456789ab",
        ),
        (f"/kubepods/besteffort/pod{POD}/{HEX}", f"kubepods:pod{POD}/container:0123456789ab"),
        ("/lxc.payload.web1", "lxc:web1"),
        (f"/system.slice/docker-{HEX}.scope/system.slice/nginx.service", "docker:0123456789ab/nginx.service"),
        # A 64-hex name alone is no container: only under a runtime's directory or a pod.
        (f"/{HEX}", None),
        ("/egress-auditor-42-abcdef", None),
    ],
)
def test_service_of_names_the_unit_or_container(path: str | None, service: str | None) -> None:
    assert service_of(path) == service


def test_resolver_finds_a_path_by_inode_when_handles_are_not_available(tmp_path: Path) -> None:
    # tmpfs/ext4 refuse cgroup file handles, so this exercises the walk over the tree.
    deep = tmp_path / "system.slice" / "demo.service"
    deep.mkdir(parents=True)
    resolver = CgroupResolver(root=tmp_path)
    assert resolver.path(os.stat(deep).st_ino) == "/system.slice/demo.service"
    assert resolver.service(os.stat(deep).st_ino) == "demo.service"
    assert resolver.path(os.stat(tmp_path).st_ino) == "/"
    assert resolver.path(0) is None
    resolver.close()


def test_resolver_cache_is_bounded(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"c{i}").mkdir()
    resolver = CgroupResolver(root=tmp_path, max_entries=5)
    assert resolver.path(os.stat(tmp_path / "c3").st_ino) == "/c3"
    assert len(resolver._cache) <= 5


def test_audit_cgroup_contains_itself_and_below_only() -> None:
    group = AuditCgroup(path=Path("/sys/fs/cgroup/egress-auditor-1-abc"), id=77, root=Path("/sys/fs/cgroup"))
    assert group.relative == "/egress-auditor-1-abc"
    assert group.contains("/egress-auditor-1-abc")
    assert group.contains("/egress-auditor-1-abc/make.scope/sub")
    assert not group.contains("/egress-auditor-1-abcdef")  # a sibling sharing the prefix
    assert not group.contains("/")
    assert not group.contains(None)


def test_a_cgroup_made_after_a_walk_is_found_by_the_next_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = CgroupResolver(root=tmp_path)
    assert resolver.path(2**40) is None  # walks the tree: no such id
    late = tmp_path / "late.scope"
    late.mkdir()
    assert resolver.path(os.stat(late).st_ino) is None  # walks are paced: not looked for yet...
    monkeypatch.setattr(cgroups, "WALK_INTERVAL_S", 0.0)
    assert resolver.path(os.stat(late).st_ino) == "/late.scope"  # ...and not remembered as missing
