/* The flow map, statistics and event buffer shared by every connect
 * program (TCP and UDP). User space compiles one object from this piece
 * followed by the programs in use (BCC rewrites map calls only in its main
 * text, so the pieces are joined rather than #included). */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/in6.h>
#include "events.h"

/* The little used from <uapi/linux/in.h> and <linux/socket.h>, as their uapi
 * defines it: those headers pull in much of the kernel's and cost about 0.3 s
 * of compiling at every start. */
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
struct sockaddr;
struct iovec;
struct sockaddr_in {
    unsigned short sin_family; /* __kernel_sa_family_t */
    __be16 sin_port;
    struct { __be32 s_addr; } sin_addr;
    unsigned char __pad[8];
};
struct user_msghdr {
    void *msg_name;
    int msg_namelen;
    struct iovec *msg_iov;
    __kernel_size_t msg_iovlen;
    void *msg_control;
    __kernel_size_t msg_controllen;
    unsigned int msg_flags;
};

#ifndef EA_MAX_FLOWS
#define EA_MAX_FLOWS 65536
#endif
#ifndef EA_RINGBUF_PAGES
#define EA_RINGBUF_PAGES 256
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

/* A destination from a cgroup hook or a sockaddr: IPv4, port in network order. */
static __always_inline void fill_v4(struct ea_connect_event *ev, u8 protocol, u32 daddr, u16 dport_be)
{
    ev->protocol = protocol;
    ev->family = EA_AF_INET;
    ev->dport = ntohs(dport_be);
    __builtin_memcpy(ev->daddr, &daddr, 4);
}

/* IPv6, with IPv4-mapped destinations keyed as the IPv4 they are on the wire. */
static __always_inline void fill_v6(struct ea_connect_event *ev, u8 protocol, const u8 *daddr, u16 dport_be)
{
    ev->protocol = protocol;
    ev->dport = ntohs(dport_be);
    if (is_v4_mapped(daddr)) {
        ev->family = EA_AF_INET;
        __builtin_memcpy(ev->daddr, &daddr[12], 4);
    } else {
        ev->family = EA_AF_INET6;
        __builtin_memcpy(ev->daddr, daddr, 16);
    }
}

/* The destination of a cgroup sock_addr hook (connect4/6, sendmsg4/6). */
static __always_inline void fill_sock_addr(struct ea_connect_event *ev, struct bpf_sock_addr *ctx, u8 protocol, int v6)
{
    if (v6) {
        u32 words[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
        fill_v6(ev, protocol, (const u8 *)words, (u16)ctx->user_port);
    } else {
        fill_v4(ev, protocol, ctx->user_ip4, (u16)ctx->user_port);
    }
}

/* What the cgroup_skb programs need of a packet's IP header. */
struct ea_skb_head {
    u32 l4;     /* offset of the L4 header (IPv6 extension headers are not followed) */
    u16 sport;  /* L4 source port, host order: filled by the ingress program */
    u8 proto;   /* L4 protocol */
    u8 family;  /* EA_AF_INET or EA_AF_INET6 */
};

/* Read the IP header of a packet at a cgroup_skb hook; 0 if it is neither
 * IPv4 nor IPv6. Read straight from the packet when its headers are linear,
 * as they are for local TCP and UDP: these programs see every packet, and a
 * bpf_skb_load_bytes call per packet costs more than all else they do for
 * the TCP packets they let by. */
static __always_inline int skb_head(struct __sk_buff *skb, struct ea_skb_head *head)
{
    u8 *data = (u8 *)(long)skb->data;
    u8 *end = (u8 *)(long)skb->data_end;
    u8 first = 0, proto = 0;
    if (data + 10 <= end) {
        first = data[0];
        proto = (first >> 4) == 4 ? data[9] : data[6];
    } else {
        if (bpf_skb_load_bytes(skb, 0, &first, 1) != 0)
            return 0;
        bpf_skb_load_bytes(skb, (first >> 4) == 4 ? 9 : 6, &proto, 1);
    }
    head->proto = proto;
    if ((first >> 4) == 4) {
        head->family = EA_AF_INET;
        head->l4 = (first & 0x0f) * 4;
        return 1;
    }
    if ((first >> 4) == 6) {
        head->family = EA_AF_INET6;
        head->l4 = 40;
        return 1;
    }
    return 0;
}

/* The L4 source port (network order) at offset l4 of the packet; 0 if unreadable. */
static __always_inline u16 skb_sport_be(struct __sk_buff *skb, u32 l4)
{
    u8 *data = (u8 *)(long)skb->data;
    u8 *end = (u8 *)(long)skb->data_end;
    u16 sport_be = 0;
    l4 &= 0x7f; /* at most 60 (IPv4 options) or 40 (IPv6): a bound the verifier can see */
    if (data + l4 + 2 <= end)
        __builtin_memcpy(&sport_be, data + l4, 2);
    else
        bpf_skb_load_bytes(skb, l4, &sport_be, 2);
    return sport_be;
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

#ifdef EA_TASK_COMM
/* The bytes of a name word up to its first NUL, the rest zero; `more`: set
 * to 0 once a NUL is found. The lowest byte flagged by the zero-byte test is
 * the first NUL (a borrow only runs upward from it). */
static __always_inline u64 name_word(u64 word, u64 *more)
{
    u64 nul = (word - 0x0101010101010101ULL) & ~word & 0x8080808080808080ULL;
    u64 keep = nul ? ((nul & -nul) >> 7) - 1 : ~0ULL;
    word &= keep & *more;
    if (nul)
        *more = 0;
    return word;
}

/* A task's 16 name bytes as bpf_get_current_comm gives them: up to 15 bytes
 * to the first NUL, zero after (the kernel pads names with zeros when it
 * sets them, but the flow key must not depend on that). */
static __always_inline void task_name(u64 head, u64 tail, char *comm)
{
    u64 more = ~0ULL;
    head = name_word(head, &more);
    tail = name_word(tail, &more) & 0x00FFFFFFFFFFFFFFULL;
    __builtin_memcpy(&comm[0], &head, 8);
    __builtin_memcpy(&comm[8], &tail, 8);
}
#endif

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
 * sync (10 ms of margin): the coarse clock is exact enough and cheaper, but
 * the kernel refuses it to tracing programs (kprobes, tracepoints). */
static __always_inline u64 repeat_time(int coarse)
{
    return coarse ? bpf_ktime_get_coarse_ns() : bpf_ktime_get_ns();
}

#ifdef EA_COUNT_LINES
/* The key's fingerprint: two NH sums (Toeplitz: the second takes the keys
 * two words on) under 12 random 32-bit keys drawn at each start. NH is
 * 2^-32-almost-universal, so two distinct flow keys share both sums with
 * probability 2^-64 whatever the processes that name flows (comm) choose,
 * as long as they cannot read the keys; at about a third of SipHash's cost
 * here, which took most of what the count lines save. */
static __always_inline u64 nh_pair(u32 a, u32 b, u32 ka, u32 kb)
{
    return (u64)(u32)(a + ka) * (u64)(u32)(b + kb);
}

struct ea_fingerprint {
    u64 fp;
    u64 fp2;
};

static __always_inline struct ea_fingerprint flow_fingerprint(const struct ea_flow_key *key)
{
    u32 m[10];
    _Static_assert(sizeof(*key) == sizeof(m), "the key is ten 32-bit words");
    __builtin_memcpy(m, key, sizeof(m));
    struct ea_fingerprint f;
    f.fp = nh_pair(m[0], m[1], EA_FP_K0, EA_FP_K1) + nh_pair(m[2], m[3], EA_FP_K2, EA_FP_K3) +
           nh_pair(m[4], m[5], EA_FP_K4, EA_FP_K5) + nh_pair(m[6], m[7], EA_FP_K6, EA_FP_K7) +
           nh_pair(m[8], m[9], EA_FP_K8, EA_FP_K9);
    f.fp2 = nh_pair(m[0], m[1], EA_FP_K2, EA_FP_K3) + nh_pair(m[2], m[3], EA_FP_K4, EA_FP_K5) +
            nh_pair(m[4], m[5], EA_FP_K6, EA_FP_K7) + nh_pair(m[6], m[7], EA_FP_K8, EA_FP_K9) +
            nh_pair(m[8], m[9], EA_FP_K10, EA_FP_K11);
    if (!f.fp)
        f.fp = 1; /* 0 marks a free slot */
    return f;
}

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

#ifndef EA_DNS_PORT
#define EA_DNS_PORT 53
#endif

#ifdef EA_DNS
/* Sockets that talk to port 53, so their answers can be tied to a process. */
BPF_TABLE("lru_hash", u64, struct ea_dns_owner, dns_owners, 8192);

static __always_inline void remember_dns_owner(u64 cookie, struct ea_connect_event *ev)
{
    struct ea_dns_owner owner = {.pid = ev->pid, .uid = ev->uid};
    __builtin_memcpy(owner.comm, ev->comm, sizeof(owner.comm));
    dns_owners.update(&cookie, &owner);
}
#endif

#ifdef EA_UDP_SYSCALLS
/* connect() in flight per thread (syscall path): whether TCP took it. */
struct ea_pending_connect {
    struct ea_connect_event ev;
    u8 is_tcp;
};
BPF_HASH(pending_connects, u32, struct ea_pending_connect, 4096);

/* Called by the TCP programs: this thread's connect() is a TCP one. */
static __always_inline void mark_tcp_connect(void)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ea_pending_connect *pending = pending_connects.lookup(&tid);
    if (pending)
        pending->is_tcp = 1;
}
#endif
