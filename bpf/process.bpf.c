/* Process lineage: forks, execs (with the start of argv) and exits, sent
 * through their own ring buffer to egress_auditor/attribution/lineage_tracer.py.
 *   fork: task:task_newtask, which carries clone_flags so threads
 *         (CLONE_THREAD) are left out in the kernel; sched:sched_process_fork
 *         when the kernel lacks it (EA_FORK_SCHED: threads then look like
 *         processes, which user space tolerates)
 *   exec: sched:sched_process_exec, with argv read from the new image's
 *         stack (argc, then the argv pointers, at the user stack pointer that
 *         exec has just set: the ELF start-up ABI); with EA_EXEC_ARGS_SYSCALLS
 *         (kernels before 5.15, without bpf_task_pt_regs) argv is kept at
 *         syscalls:sys_enter_execve{,at} instead, which puts every syscall of
 *         the host on the tracing slow path while attached
 *   exit: sched:sched_process_exit, for the last thread (group_dead, or the
 *         leader when the field is absent: EA_EXIT_LEADER)
 * Only tracepoint fields, helpers, the user registers (the ptrace ABI) and
 * user memory (argv) are read: never task_struct, whose layout differs
 * between kernel builds. */
#include <uapi/linux/ptrace.h>
#include "events.h"

#ifndef EA_LINEAGE_PAGES
#define EA_LINEAGE_PAGES 256
#endif
#ifndef EA_PENDING_EXECS
#define EA_PENDING_EXECS 1024
#endif
#define EA_CLONE_THREAD 0x00010000

/* argv as read for one exec. Twice EA_ARGS_SIZE so a word starting below
 * EA_ARGS_SIZE always fits. */
struct ea_pending_exec {
    u32 flags;
    u16 args_size;
    u16 argc;
    char args[2 * EA_ARGS_SIZE];
};

BPF_RINGBUF_OUTPUT(lineage_events, EA_LINEAGE_PAGES);
BPF_PERCPU_ARRAY(lineage_stats, u64, EA_PSTAT_SLOTS);
BPF_PERCPU_ARRAY(event_scratch, struct ea_process_event, 1);
BPF_PERCPU_ARRAY(exec_scratch, struct ea_pending_exec, 1);
#ifdef EA_EXEC_ARGS_SYSCALLS
/* argv read at execve entry, keyed by thread id, until the exec succeeds.
 * LRU: an exec that fails and is never retried leaves its entry to be evicted. */
BPF_TABLE("lru_hash", u32, struct ea_pending_exec, pending_execs, EA_PENDING_EXECS);
#endif

static __always_inline void count_stat(int slot)
{
    u64 *value = lineage_stats.lookup(&slot);
    if (value)
        (*value)++;
}

/* A zeroed-header event for the current task, from the per-CPU scratch
 * (the event is too large for the BPF stack). */
static __always_inline struct ea_process_event *new_event(u32 kind)
{
    int zero = 0;
    struct ea_process_event *ev = event_scratch.lookup(&zero);
    if (!ev)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u64 ids = bpf_get_current_uid_gid();
    ev->ts_ns = bpf_ktime_get_ns();
    ev->cgroup_id = bpf_get_current_cgroup_id();
    ev->clone_flags = 0;
    ev->kind = kind;
    ev->pid = id >> 32;
    ev->tid = (u32)id;
    ev->ppid = 0;
    ev->uid = (u32)ids;
    ev->gid = ids >> 32;
    ev->flags = 0;
    ev->args_size = 0;
    ev->argc = 0;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
    return ev;
}

static __always_inline void send(struct ea_process_event *ev, u32 size)
{
    count_stat(EA_PSTAT_EVENTS);
    if (lineage_events.ringbuf_output(ev, size, 0) != 0)
        count_stat(EA_PSTAT_LOST);
}

#define EA_HEAD_SIZE __builtin_offsetof(struct ea_process_event, filename)

#ifdef EA_FORK_SCHED
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    struct ea_process_event *ev = new_event(EA_PROC_FORK);
    if (!ev)
        return 0;
    ev->ppid = ev->pid; /* runs in the parent: the helper gives its process id */
    ev->pid = args->child_pid;
    send(ev, EA_HEAD_SIZE);
    return 0;
}
#else
TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & EA_CLONE_THREAD)
        return 0;
    struct ea_process_event *ev = new_event(EA_PROC_FORK);
    if (!ev)
        return 0;
    ev->ppid = ev->pid; /* runs in the parent: the helper gives its process id */
    ev->pid = args->pid;
    ev->clone_flags = args->clone_flags;
    send(ev, EA_HEAD_SIZE);
    return 0;
}
#endif

/* Copy argv into the event, from where it was kept for this exec. */
static __always_inline void put_args(struct ea_process_event *ev, struct ea_pending_exec *kept)
{
    ev->flags |= kept->flags;
    ev->argc = kept->argc;
    ev->args_size = kept->args_size;
    bpf_probe_read_kernel(ev->args, EA_ARGS_SIZE, kept->args);
}

#ifdef EA_EXEC_ARGS_SYSCALLS
/* Copy the start of argv from the caller's memory, before exec replaces it. */
static __always_inline void keep_argv(const char *const *argv)
{
    int zero = 0;
    struct ea_pending_exec *pending = exec_scratch.lookup(&zero);
    if (!pending)
        return;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u32 off = 0;
    pending->flags = 0;
    pending->argc = 0;
#pragma unroll
    for (int i = 0; i < EA_MAX_ARGS; i++) {
        const char *word = 0;
        if (bpf_probe_read_user(&word, sizeof(word), &argv[i]) != 0) {
            pending->flags |= EA_PROC_ARGS_MISSING;
            goto done;
        }
        if (!word)
            goto done;
        if (off >= EA_ARGS_SIZE) {
            pending->flags |= EA_PROC_ARGS_CUT;
            goto done;
        }
        long n = bpf_probe_read_user_str(&pending->args[off & (EA_ARGS_SIZE - 1)], EA_ARGS_SIZE, word);
        if (n <= 0) {
            pending->flags |= EA_PROC_ARGS_MISSING;
            goto done;
        }
        off += n;
        pending->argc++;
    }
    /* EA_MAX_ARGS words read: more follow unless the next pointer is NULL. */
    {
        const char *next = 0;
        if (bpf_probe_read_user(&next, sizeof(next), &argv[EA_MAX_ARGS]) != 0 || next)
            pending->flags |= EA_PROC_ARGS_CUT;
    }
done:
    if (off > EA_ARGS_SIZE) {
        off = EA_ARGS_SIZE;
        pending->flags |= EA_PROC_ARGS_CUT;
    }
    pending->args_size = off;
    pending_execs.update(&tid, pending);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    keep_argv(args->argv);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    keep_argv(args->argv);
    return 0;
}

/* A thread other than the leader that execs takes the leader's pid: its
 * argv was kept under the thread id it had (old_tid). */
static __always_inline void exec_args(struct ea_process_event *ev, u32 old_tid)
{
    struct ea_pending_exec *pending = pending_execs.lookup(&old_tid);
    if (!pending) {
        ev->flags |= EA_PROC_ARGS_MISSING;
        return;
    }
    put_args(ev, pending);
    pending_execs.delete(&old_tid);
}
#else
/* One word of the new image's start-up stack: 8 bytes, or 4 for a 32-bit
 * process (whose stack lies below 4 GiB, where a 64-bit one's never does). */
static __always_inline u64 stack_word(u64 at, u32 size)
{
    u64 word = 0;
    if (bpf_probe_read_user(&word, size & 8 ? 8 : 4, (void *)at) != 0)
        return 0;
    return word;
}

/* argv of the image exec has just loaded, before it runs a single
 * instruction: at the user stack pointer lie argc, then the argv pointers,
 * whose strings are laid out back to back (what /proc/PID/cmdline reads;
 * for a script, its interpreter's argv). Only argv is read, never the
 * environment that follows it. */
static __always_inline void exec_args(struct ea_process_event *ev, u32 old_tid)
{
    int zero = 0;
    struct ea_pending_exec *kept = exec_scratch.lookup(&zero);
    if (!kept)
        return;
    kept->flags = 0;
    kept->argc = 0;
    kept->args_size = 0;
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 sp = 0;
    if (bpf_probe_read_kernel(&sp, sizeof(sp), &PT_REGS_SP(regs)) != 0 || !sp) {
        ev->flags |= EA_PROC_ARGS_MISSING;
        return;
    }
    u32 size = sp >> 32 ? 8 : 4;
    u64 argc = stack_word(sp, size);
    if (argc == 0) {
        put_args(ev, kept); /* execve with an empty argv (kernels before 5.18 allow it) */
        return;
    }
    u64 first = stack_word(sp + size, size);
    u64 last = stack_word(sp + size * argc, size); /* argv[argc - 1] */
    if (!first || last < first) {
        ev->flags |= EA_PROC_ARGS_MISSING;
        return;
    }
    kept->argc = argc > 0xffff ? 0xffff : argc;
    u64 before = last - first; /* bytes of the words before the last one */
    u32 off = 0;
    if (before >= EA_ARGS_SIZE) {
        if (bpf_probe_read_user(kept->args, EA_ARGS_SIZE, (void *)first) == 0)
            off = EA_ARGS_SIZE;
        kept->flags |= off ? EA_PROC_ARGS_CUT : EA_PROC_ARGS_MISSING;
    } else if (bpf_probe_read_user(kept->args, before & (EA_ARGS_SIZE - 1), (void *)first) != 0) {
        kept->flags |= EA_PROC_ARGS_MISSING;
    } else {
        off = before;
        long n = bpf_probe_read_user_str(&kept->args[off & (EA_ARGS_SIZE - 1)], EA_ARGS_SIZE, (void *)last);
        if (n <= 0)
            kept->flags |= EA_PROC_ARGS_MISSING;
        else
            off += n;
        /* n == EA_ARGS_SIZE: the last word may have been cut to fit */
        if (off > EA_ARGS_SIZE || n == EA_ARGS_SIZE) {
            kept->flags |= EA_PROC_ARGS_CUT;
            off = EA_ARGS_SIZE;
        }
    }
    kept->args_size = off;
    put_args(ev, kept);
}
#endif

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    struct ea_process_event *ev = new_event(EA_PROC_EXEC);
    if (!ev)
        return 0;
    exec_args(ev, args->old_pid);
    unsigned short offset = args->data_loc_filename & 0xFFFF;
    unsigned short length = args->data_loc_filename >> 16;
    bpf_probe_read_kernel_str(ev->filename, sizeof(ev->filename), (char *)args + offset);
    if (length > sizeof(ev->filename))
        ev->flags |= EA_PROC_FILENAME_CUT;
    send(ev, sizeof(*ev));
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
#ifdef EA_EXIT_LEADER
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)id != (id >> 32))
        return 0;
#else
    if (!args->group_dead)
        return 0;
#endif
    struct ea_process_event *ev = new_event(EA_PROC_EXIT);
    if (ev)
        send(ev, EA_HEAD_SIZE);
    return 0;
}
