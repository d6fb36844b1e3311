/* The flow map and statistics shared by every connect program (TCP and UDP):
 * each connect is counted in its flow, and only a flow's first crosses to user
 * space. User space compiles one object from output.bpf.c, this piece, then
 * the programs in use (BCC rewrites map calls only in its main text, so the
 * pieces that use maps are joined; map-free helpers are #included). */
#include <uapi/linux/ptrace.h>
#include "events.h"
#include "task_name.bpf.h"
#ifdef EA_COUNT_LINES
#include "fingerprint.bpf.h"
#endif

#ifndef EA_MAX_FLOWS
#define EA_MAX_FLOWS 65536
#endif
/* Two generations of the flow map: programs count in the one flow_gens[0]
 * points to. User space points it at the other, which waits for every
 * program in flight (an update of a map of maps returns after
 * synchronize_rcu), then drains the old one exactly and empties it
 * (docs/decisions/flow-map-generations.md). Each holds one more entry: its
 * mark (the all-zero key, no flow's family), whose count is the generation's
 * epoch, copied into the new-flow events counted in it. */
BPF_HASH(flows, struct ea_flow_key, struct ea_flow_stats, EA_MAX_FLOWS + 1);
BPF_HASH(flows_next, struct ea_flow_key, struct ea_flow_stats, EA_MAX_FLOWS + 1);
BPF_ARRAY_OF_MAPS(flow_gens, "flows", 1);
#ifdef EA_COUNT_LINES
/* A flow map lookup touches three or four cache lines (bucket, element) that,
 * with thousands of flows in turn, have left the CPU's caches; a repeat
 * counted in its count line touches one (docs/decisions/count-lines.md).
 * Mapped into user space, which claims slots: EA_COUNT_LINES is a power of two. */
BPF_F_TABLE("array", u32, struct ea_count_line, count_lines, EA_COUNT_LINES, BPF_F_MMAPABLE);
#endif
BPF_PERCPU_ARRAY(stats, u64, EA_STAT_SLOTS);
#ifdef EA_CGROUP_FILTER
/* trace -- CMD (egress_auditor/command.py): only connects from the command's
 * cgroup (EA_CGROUP_ID, at depth EA_CGROUP_LEVEL) and cgroups below it are
 * counted, so a host flow with the same key never hides the command's. */
BPF_HASH(command_cgroups, u64, u8, 1024);
#endif

static __always_inline void count_stat(int slot)
{
    u64 *value = stats.lookup(&slot);
    if (value)
        (*value)++;
}

static __always_inline void emit(void *ctx, struct ea_connect_event *ev)
{
    if (submit_event(ctx, ev) != 0)
        count_stat(EA_STAT_EVENTS_LOST);
}

/* Who is connecting, from the current task: valid in process context only.
 * The flow key holds the uid and the name; the rest is read only for the
 * connects that leave for user space (fill_task). With the offsets from the
 * kernel's BTF (task_fields.py), read from the task in a few loads where the
 * two helpers take about 70 ns. */
static __always_inline void fill_key_identity(struct ea_connect_event *ev)
{
#ifdef EA_TASK_COMM
    const char *task = (const char *)bpf_get_current_task_btf();
    const char *cred = *(const char *const *)(task + EA_TASK_CRED);
    ev->uid = *(const u32 *)(cred + EA_CRED_UID);
    ev->gid = *(const u32 *)(cred + EA_CRED_GID);
    task_name(*(const u64 *)(task + EA_TASK_COMM), *(const u64 *)(task + EA_TASK_COMM + 8), ev->comm);
#else
    u64 ids = bpf_get_current_uid_gid();
    ev->uid = (u32)ids;
    ev->gid = ids >> 32;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
#endif
}

static __always_inline void fill_task(struct ea_connect_event *ev)
{
    u64 id = bpf_get_current_pid_tgid();
    ev->pid = id >> 32;
    ev->tid = (u32)id;
    ev->cgroup_id = bpf_get_current_cgroup_id();
#ifdef EA_CGROUP_FILTER
    if (bpf_get_current_ancestor_cgroup_id(EA_CGROUP_LEVEL) == EA_CGROUP_ID) {
        u8 inside = 1;
        command_cgroups.update(&ev->cgroup_id, &inside);
    }
#endif
}

static __always_inline void fill_identity(struct ea_connect_event *ev)
{
    fill_key_identity(ev);
    fill_task(ev);
}

/* A repeat's time only tells user space which flows moved since its last
 * sync: the coarse clock is exact enough and cheaper, but
 * the kernel refuses it to tracing programs (kprobes, tracepoints). */
static __always_inline u64 repeat_time(int coarse)
{
    return coarse ? bpf_ktime_get_coarse_ns() : bpf_ktime_get_ns();
}

#ifdef EA_COUNT_LINES
/* 1 if the flow holds a slot in its count line, and the connect is counted there. */
static __always_inline int count_in_line(struct ea_fingerprint fp, int coarse)
{
    /* NH is linear in the key: its bits are folded and multiplied first (count_lines.py: fingerprint_line) */
    u32 index = (((fp.fp ^ (fp.fp >> 32)) * EA_LINE_MUL) >> 32) >> (32 - EA_LINE_BITS);
    struct ea_count_line *line = count_lines.lookup(&index);
    if (!line)
        return 0;
#pragma unroll
    for (int i = 0; i < EA_LINE_SLOTS; i++) {
        struct ea_count_slot *slot = &line->slot[i];
        if (slot->fp == fp.fp && slot->fp2 == fp.fp2) {
            __sync_fetch_and_add(&slot->count, 1);
            slot->last_ns = repeat_time(coarse);
            return 1;
        }
    }
    return 0;
}
#endif

/* Count the connect in its flow: in its count line once user space gave it
 * a slot, else in the flow map. Only a flow's first connect (or any
 * connect while the map is full) crosses to user space. The key identity
 * in `ev` is filled in; with `task_later`, the rest is read from the current
 * task only if the event is sent, else it is filled in already. `coarse`:
 * called from a cgroup program, which may read the coarse clock. */
static __always_inline void count_flow_at(void *ctx, struct ea_connect_event *ev, int task_later, int coarse)
{
    struct ea_flow_key key = {};
    struct ea_flow_stats *known;

#ifdef EA_CGROUP_FILTER
    if (task_later) {
        fill_task(ev); /* the filter needs the cgroup of every connect */
        task_later = 0;
    }
    if (!command_cgroups.lookup(&ev->cgroup_id))
        return;
#endif
    __builtin_memcpy(key.daddr, ev->daddr, sizeof(key.daddr));
    key.uid = ev->uid;
    key.dport = ev->dport;
    key.family = ev->family;
    key.protocol = ev->protocol;
    __builtin_memcpy(key.comm, ev->comm, sizeof(key.comm));

#ifdef EA_COUNT_LINES
    struct ea_fingerprint fp = flow_fingerprint(&key);
    if (count_in_line(fp, coarse))
        return;
#else
    struct { u64 fp, fp2; } fp = {};
#endif
    int live_slot = 0;
    void *live = flow_gens.lookup(&live_slot);
    if (!live) { /* no generation set: every connect crosses, none is lost */
        ev->ts_ns = bpf_ktime_get_ns();
        if (task_later)
            fill_task(ev);
        goto map_full;
    }
    known = bpf_map_lookup_elem(live, &key);
    if (known) {
        __sync_fetch_and_add(&known->count, 1);
        known->last_ns = repeat_time(coarse);
        return;
    }
    u64 now = bpf_ktime_get_ns();
    ev->ts_ns = now;
    if (task_later)
        fill_task(ev);
    struct ea_flow_stats fresh = {.count = 1, .first_ns = now, .last_ns = now, .fp = fp.fp, .fp2 = fp.fp2};
    int err = bpf_map_update_elem(live, &key, &fresh, BPF_NOEXIST);
    if (err == 0) {
        struct ea_flow_key mark_key = {};
        struct ea_flow_stats *mark = bpf_map_lookup_elem(live, &mark_key);
        ev->epoch = mark ? (u32)mark->count : 0;
        ev->flags = EA_EVENT_NEW_FLOW;
        emit(ctx, ev);
        return;
    }
    /* Another CPU inserted the same flow first. */
    known = bpf_map_lookup_elem(live, &key);
    if (known) {
        __sync_fetch_and_add(&known->count, 1);
        known->last_ns = now;
        return;
    }
map_full:
    count_stat(EA_STAT_MAP_FULL);
    ev->flags = EA_EVENT_MAP_FULL;
    emit(ctx, ev);
}

/* Count a connect whose identity in `ev` is filled in (it may be another task's). */
static __always_inline void count_flow(void *ctx, struct ea_connect_event *ev, int coarse)
{
    count_flow_at(ctx, ev, 0, coarse);
}

/* Count a connect made by the current task. */
static __always_inline void record_connect(void *ctx, struct ea_connect_event *ev, int coarse)
{
    fill_key_identity(ev);
    count_flow_at(ctx, ev, 1, coarse);
}

