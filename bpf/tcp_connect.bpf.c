/* New outbound TCP connections, counted per flow in the kernel.
 * Attach path chosen at compile time:
 *   EA_PATH_KPROBE      kprobes on tcp_v4_connect / tcp_v6_connect
 *   EA_PATH_TRACEPOINT  sock:inet_sock_set_state, CLOSE -> SYN_SENT
 * Output: EA_USE_RINGBUF selects the ring buffer, else a perf buffer.
 * Only stable interfaces are read: tracepoint fields, helpers and uapi
 * sockaddr structs, never struct sock (its layout varies by kernel build). */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <linux/socket.h>
#include "events.h"

#ifndef EA_MAX_FLOWS
#define EA_MAX_FLOWS 65536
#endif
#ifndef EA_RINGBUF_PAGES
#define EA_RINGBUF_PAGES 64
#endif

BPF_HASH(flows, struct ea_flow_key, struct ea_flow_stats, EA_MAX_FLOWS);
BPF_PERCPU_ARRAY(stats, u64, EA_STAT_SLOTS);
#ifdef EA_USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, EA_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

static __always_inline void count_stat(int slot)
{
    u64 *value = stats.lookup(&slot);
    if (value)
        (*value)++;
}

/* IPv4-mapped IPv6 (::ffff:a.b.c.d) leaves the host as IPv4: key it so. */
static __always_inline int is_v4_mapped(const u8 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0 && a[4] == 0 &&
           a[5] == 0 && a[6] == 0 && a[7] == 0 && a[8] == 0 && a[9] == 0 &&
           a[10] == 0xff && a[11] == 0xff;
}

static __always_inline void emit(void *ctx, struct ea_connect_event *ev)
{
#ifdef EA_USE_RINGBUF
    if (events.ringbuf_output(ev, sizeof(*ev), 0) != 0)
        count_stat(EA_STAT_EVENTS_LOST);
#else
    if (events.perf_submit(ctx, ev, sizeof(*ev)) != 0)
        count_stat(EA_STAT_EVENTS_LOST);
#endif
}

/* Count the connect in its flow; only a flow's first connect (or any
 * connect while the map is full) crosses to user space. */
static __always_inline void record_connect(void *ctx, struct ea_connect_event *ev)
{
    struct ea_flow_key key = {};
    struct ea_flow_stats *known;
    u64 now = bpf_ktime_get_ns();
    u64 id = bpf_get_current_pid_tgid();
    u64 ids = bpf_get_current_uid_gid();

    count_stat(EA_STAT_CONNECTS);
    ev->ts_ns = now;
    ev->pid = id >> 32;
    ev->tid = (u32)id;
    ev->uid = (u32)ids;
    ev->gid = ids >> 32;
    ev->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));

    __builtin_memcpy(key.daddr, ev->daddr, sizeof(key.daddr));
    key.uid = ev->uid;
    key.dport = ev->dport;
    key.family = ev->family;
    key.protocol = ev->protocol;
    __builtin_memcpy(key.comm, ev->comm, sizeof(key.comm));

    known = flows.lookup(&key);
    if (known) {
        __sync_fetch_and_add(&known->count, 1);
        known->last_ns = now;
        return;
    }
    struct ea_flow_stats fresh = {.count = 1, .first_ns = now, .last_ns = now};
    int err = flows.insert(&key, &fresh);
    if (err == 0) {
        ev->flags = EA_EVENT_NEW_FLOW;
        emit(ctx, ev);
        return;
    }
    /* Another CPU inserted the same flow first. */
    known = flows.lookup(&key);
    if (known) {
        __sync_fetch_and_add(&known->count, 1);
        known->last_ns = now;
        return;
    }
    count_stat(EA_STAT_MAP_FULL);
    ev->flags = EA_EVENT_MAP_FULL;
    emit(ctx, ev);
}

#ifdef EA_PATH_TRACEPOINT
#define EA_TCP_CLOSE 7
#define EA_TCP_SYN_SENT 2

/* Fires in the connecting task's context: tcp_v{4,6}_connect sets SYN_SENT. */
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != IPPROTO_TCP)
        return 0;
    if (args->oldstate != EA_TCP_CLOSE || args->newstate != EA_TCP_SYN_SENT)
        return 0;

    struct ea_connect_event ev = {};
    ev.protocol = IPPROTO_TCP;
    ev.sport = args->sport;
    ev.dport = args->dport;
    if (args->family == EA_AF_INET) {
        ev.family = EA_AF_INET;
        __builtin_memcpy(ev.saddr, args->saddr, 4);
        __builtin_memcpy(ev.daddr, args->daddr, 4);
    } else if (args->family == EA_AF_INET6) {
        u8 daddr[16], saddr[16];
        __builtin_memcpy(daddr, args->daddr_v6, 16);
        __builtin_memcpy(saddr, args->saddr_v6, 16);
        if (is_v4_mapped(daddr)) {
            ev.family = EA_AF_INET;
            __builtin_memcpy(ev.daddr, &daddr[12], 4);
            if (is_v4_mapped(saddr))
                __builtin_memcpy(ev.saddr, &saddr[12], 4);
        } else {
            ev.family = EA_AF_INET6;
            __builtin_memcpy(ev.daddr, daddr, 16);
            __builtin_memcpy(ev.saddr, saddr, 16);
        }
    } else {
        return 0;
    }
    record_connect(args, &ev);
    return 0;
}
#endif /* EA_PATH_TRACEPOINT */

#ifdef EA_PATH_KPROBE
/* The destination comes from the sockaddr the kernel copied from connect(2);
 * the source is not chosen yet at entry. */
int trace_v4(struct pt_regs *ctx, void *sk, struct sockaddr *uaddr, int addr_len)
{
    struct sockaddr_in sin = {};
    if (addr_len < (int)sizeof(sin))
        return 0;
    bpf_probe_read_kernel(&sin, sizeof(sin), uaddr);
    if (sin.sin_family != EA_AF_INET)
        return 0;
    struct ea_connect_event ev = {};
    ev.protocol = IPPROTO_TCP;
    ev.family = EA_AF_INET;
    ev.dport = ntohs(sin.sin_port);
    __builtin_memcpy(ev.daddr, &sin.sin_addr.s_addr, 4);
    record_connect(ctx, &ev);
    return 0;
}

int trace_v6(struct pt_regs *ctx, void *sk, struct sockaddr *uaddr, int addr_len)
{
    struct sockaddr_in6 sin6 = {};
    if (addr_len < (int)sizeof(sin6))
        return 0;
    bpf_probe_read_kernel(&sin6, sizeof(sin6), uaddr);
    if (sin6.sin6_family != EA_AF_INET6)
        return 0;
    /* tcp_v6_connect hands mapped addresses to tcp_v4_connect: counted there. */
    if (is_v4_mapped(sin6.sin6_addr.s6_addr))
        return 0;
    struct ea_connect_event ev = {};
    ev.protocol = IPPROTO_TCP;
    ev.family = EA_AF_INET6;
    ev.dport = ntohs(sin6.sin6_port);
    __builtin_memcpy(ev.daddr, sin6.sin6_addr.s6_addr, 16);
    record_connect(ctx, &ev);
    return 0;
}
#endif /* EA_PATH_KPROBE */
