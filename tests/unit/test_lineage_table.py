"""ProcessTable against hand-written kernel events: reused PIDs, exec chains,
CLONE_PARENT, seeds racing the first events, losses and the bound."""

from __future__ import annotations

from egress_auditor.attribution.lineage import (
    CLONE_PARENT,
    PROC_EXEC,
    PROC_EXIT,
    PROC_FORK,
    Image,
    Life,
    ProcessEvent,
    ProcessTable,
    process_name,
)
from egress_auditor.model import Attribution

MS = 1_000_000


def table() -> ProcessTable:
    return ProcessTable(max_lives=1000, epoch_offset=1_000_000.0)


def at(t: ProcessTable, ns: int) -> float:
    return t.to_epoch(ns)


def fork(t: ProcessTable, ts: int, child: int, parent: int, uid: int = 1000, flags: int = 0) -> None:
    t.apply(ProcessEvent(PROC_FORK, ts, child, ppid=parent, uid=uid, gid=uid, comm="forker", clone_flags=flags))


def exec_(t: ProcessTable, ts: int, pid: int, path: str, *args: str, uid: int = 1000) -> None:
    name = path.rsplit("/", 1)[-1][:15]
    t.apply(ProcessEvent(PROC_EXEC, ts, pid, uid=uid, gid=uid, comm=name, filename=path, args=(path, *args)))


def exit_(t: ProcessTable, ts: int, pid: int) -> None:
    t.apply(ProcessEvent(PROC_EXIT, ts, pid))


def shell_and_curl(t: ProcessTable) -> None:
    fork(t, 1 * MS, 100, 1)
    exec_(t, 2 * MS, 100, "/usr/bin/bash", "-l")
    fork(t, 10 * MS, 101, 100)
    exec_(t, 11 * MS, 101, "/usr/bin/curl", "https://example.org/")
    exit_(t, 20 * MS, 101)


def test_a_process_that_already_exited_is_named_with_parent_and_grandparent() -> None:
    t = table()
    fork(t, 0, 1, 0, uid=0)
    exec_(t, 0, 1, "/sbin/init", uid=0)
    shell_and_curl(t)
    curl = t.process(101, at(t, 15 * MS), uid=1000, gid=1000)
    assert curl is not None
    assert (curl.name, curl.exe, curl.cmdline) == ("curl", "/usr/bin/curl", ("/usr/bin/curl", "https://example.org/"))
    assert curl.attribution is Attribution.KERNEL
    assert curl.start_time is not None and abs(curl.start_time - at(t, 10 * MS)) < 1e-6
    assert curl.parent is not None and curl.parent.name == "bash" and curl.parent.pid == 100
    assert curl.parent.parent is not None and curl.parent.parent.exe == "/sbin/init"
    assert curl.parent.parent.parent is None  # two generations, as /proc attribution gives


def test_a_reused_pid_never_takes_the_old_identity() -> None:
    t = table()
    shell_and_curl(t)
    fork(t, 30 * MS, 101, 100)  # the same pid, a new process
    exec_(t, 31 * MS, 101, "/usr/bin/wget", "-q")
    first = t.process(101, at(t, 15 * MS))
    second = t.process(101, at(t, 40 * MS))
    assert first is not None and first.name == "curl"
    assert second is not None and second.name == "wget" and second.cmdline == ("/usr/bin/wget", "-q")
    assert first.start_time != second.start_time
    # Between the two lives nothing ran under that pid.
    assert t.process(101, at(t, 25 * MS)) is None


def test_a_missed_exit_is_closed_by_the_next_fork_of_that_pid() -> None:
    t = table()
    shell_and_curl(t)
    fork(t, 50 * MS, 102, 100)
    exec_(t, 51 * MS, 102, "/usr/bin/ssh")
    fork(t, 60 * MS, 102, 100)  # exit of the first 102 lost
    assert t.process(102, at(t, 61 * MS)).name == "bash"  # forked, not yet exec'd: its parent's program
    assert t.process(102, at(t, 55 * MS)).name == "ssh"


def test_connect_before_exec_gets_the_image_before_exec() -> None:
    t = table()
    shell_and_curl(t)
    fork(t, 30 * MS, 200, 100)
    exec_(t, 40 * MS, 200, "/bin/sh", "-c", "exec /usr/bin/nc example.org 80")
    exec_(t, 41 * MS, 200, "/usr/bin/nc", "example.org", "80")
    assert t.process(200, at(t, 35 * MS)).name == "bash"
    assert t.process(200, at(t, 40 * MS + MS // 2)).cmdline[:2] == ("/bin/sh", "-c")
    assert t.process(200, at(t, 50 * MS)).exe == "/usr/bin/nc"
    # Through the shell that exec'd it, the parent is still the one that forked it.
    assert t.process(200, at(t, 50 * MS)).parent.pid == 100


def test_clone_parent_makes_a_sibling() -> None:
    t = table()
    shell_and_curl(t)
    fork(t, 30 * MS, 300, 100)
    fork(t, 31 * MS, 301, 300, flags=CLONE_PARENT)
    assert t.process(301, at(t, 32 * MS)).parent.pid == 100


def test_unknown_pid_and_time_before_any_life_give_none() -> None:
    t = table()
    shell_and_curl(t)
    assert t.process(999, at(t, 15 * MS)) is None
    assert t.process(101, at(t, 5 * MS)) is None


def test_an_exec_without_its_fork_still_names_the_process() -> None:
    t = table()
    exec_(t, 5 * MS, 400, "/usr/bin/rsync", "-a")
    found = t.process(400, at(t, 6 * MS))
    assert found is not None and found.name == "rsync" and found.parent is None


def test_uid_at_connect_time_wins_over_the_uid_at_exec() -> None:
    t = table()
    fork(t, 1 * MS, 500, 1, uid=0)
    exec_(t, 2 * MS, 500, "/usr/bin/sudo", "-u", "alice", "id", uid=0)
    found = t.process(500, at(t, 3 * MS), uid=1000, gid=1000)
    assert (found.uid, found.gid) == (1000, 1000)


def seeded(pid: int, start: int, read: int, name: str, ppid_life: Life | None = None) -> Life:
    image = Image(start, name, f"/usr/bin/{name}", (name,))
    return Life(pid, start, None, 0, 0, 0, [image], seeded_ns=read)


def test_a_fork_older_than_the_seed_fixes_the_seeds_start_and_parent() -> None:
    t = table()
    t.seed([(seeded(1, 0, 100 * MS, "init"), 0), (seeded(600, 90 * MS, 100 * MS, "daemon"), 1)])
    assert t.process(600, at(t, 95 * MS)).parent.pid == 1
    fork(t, 80 * MS, 600, 1)  # the kernel saw the fork before /proc was read
    assert len(t) == 2  # no second life for the same process
    found = t.process(600, at(t, 85 * MS))
    assert found is not None and found.name == "daemon" and abs(found.start_time - at(t, 80 * MS)) < 1e-6


def test_an_exec_older_than_the_seed_is_already_in_it() -> None:
    t = table()
    t.seed([(seeded(700, 10 * MS, 100 * MS, "nginx"), 0)])
    exec_(t, 50 * MS, 700, "/usr/bin/old-name")
    assert t.process(700, at(t, 200 * MS)).name == "nginx"
    exec_(t, 150 * MS, 700, "/usr/bin/new-name")
    assert t.process(700, at(t, 200 * MS)).name == "new-name"


def test_lives_updated_before_a_loss_are_not_trusted() -> None:
    t = table()
    shell_and_curl(t)
    t.mark_loss()
    assert t.process(101, at(t, 15 * MS)) is None  # an exec may be missing: /proc decides
    fork(t, 30 * MS, 800, 100)
    exec_(t, 31 * MS, 800, "/usr/bin/git", "fetch")
    found = t.process(800, at(t, 32 * MS))
    assert found is not None and found.name == "git"


def test_the_table_is_bounded_and_evicts_exited_lives_first() -> None:
    t = ProcessTable(max_lives=10, epoch_offset=0.0)
    fork(t, 1, 1, 0)
    exec_(t, 2, 1, "/sbin/init")
    for i in range(200):
        pid = 1000 + i
        fork(t, 10 + 3 * i, pid, 1)
        exec_(t, 11 + 3 * i, pid, "/bin/true")
        exit_(t, 12 + 3 * i, pid)
    assert len(t) == 10
    assert t.evicted == 191
    assert t.process(1, t.to_epoch(10_000)).exe == "/sbin/init"  # the live one stayed
    assert t.process(1199, t.to_epoch(608)) is not None  # the newest exited ones stayed
    assert t.process(1000, t.to_epoch(11)) is None


def test_process_name_uses_the_file_name_when_comm_was_cut() -> None:
    assert process_name("systemd-resolve", "/usr/lib/systemd/systemd-resolved") == "systemd-resolved"
    assert process_name("curl", "/usr/bin/curl") == "curl"
    assert process_name("renamed-by-prct", "/usr/bin/python3") == "renamed-by-prct"
    assert process_name("", "/usr/bin/env") == "env"
