/* Benchmark reference: every new TCP connect crosses to user space.
 * Same tracepoint, same event struct and same ring buffer as the auditor's
 * tracepoint path, but no flow map: this is what in-kernel counting saves. */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/in.h>
#include "events.h"

#ifndef EA_RINGBUF_PAGES
#define EA_RINGBUF_PAGES 64
#endif
#define EA_TCP_CLOSE 7
#define EA_TCP_SYN_SENT 2

BPF_RINGBUF_OUTPUT(events, EA_RINGBUF_PAGES);
#define PE_STAT_CONNECTS 0 /* bench/per_event.py reads these two */
#define PE_STAT_EVENTS_LOST 1

BPF_PERCPU_ARRAY(stats, u64, 2);

static __always_inline void count_stat(int slot)
{
    u64 *value = stats.lookup(&slot);
    if (value)
        (*value)++;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != IPPROTO_TCP)
        return 0;
    if (args->oldstate != EA_TCP_CLOSE || args->newstate != EA_TCP_SYN_SENT)
        return 0;
    /* IPv4 only: the load generator makes nothing else. */
    if (args->family != EA_AF_INET)
        return 0;

    struct ea_connect_event ev = {};
    u64 id = bpf_get_current_pid_tgid();
    u64 ids = bpf_get_current_uid_gid();
    count_stat(PE_STAT_CONNECTS);
    ev.ts_ns = bpf_ktime_get_ns();
    ev.pid = id >> 32;
    ev.tid = (u32)id;
    ev.uid = (u32)ids;
    ev.gid = ids >> 32;
    ev.cgroup_id = bpf_get_current_cgroup_id();
    ev.flags = EA_EVENT_NEW_FLOW;
    ev.protocol = IPPROTO_TCP;
    ev.family = EA_AF_INET;
    ev.sport = args->sport;
    ev.dport = args->dport;
    __builtin_memcpy(ev.saddr, args->saddr, 4);
    __builtin_memcpy(ev.daddr, args->daddr, 4);
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    if (events.ringbuf_output(&ev, sizeof(ev), 0) != 0)
        count_stat(PE_STAT_EVENTS_LOST);
    return 0;
}
