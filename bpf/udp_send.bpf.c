/* UDP destinations, counted per flow in the kernel like TCP connects.
 * Paths, chosen at compile time:
 *   EA_UDP_CGROUP    cgroup hooks at the cgroup v2 root: sendmsg4/6 for
 *                    unconnected sends; connect4/6 remembers a connected
 *                    socket, and its first send (sock:sock_send_length with
 *                    EA_UDP_SEND_TP, else its first datagram at cgroup_skb
 *                    egress) counts it; recvmsg4/6 remembers who wrote to a
 *                    socket. glibc connects UDP sockets it never sends on
 *                    (to sort addresses, RFC 6724): those are not flows.
 *   EA_UDP_SYSCALLS  syscall tracepoints (kernels without those hooks):
 *                    sendto/sendmsg with an address, and connect() that
 *                    returned 0 without the TCP tracepoint firing in between.
 * Both read only stable interfaces: struct bpf_sock_addr, tracepoint
 * arguments and uapi structs in user memory. Follows flow_map.bpf.c and
 * dns.bpf.c, and comes before tcp_connect.bpf.c (mark_tcp_connect). */
#include "uapi.bpf.h"
#include "addr.bpf.h"
#include "skb.bpf.h"

#ifdef EA_UDP_CGROUP
/* Connected UDP sockets that have not sent yet: by the socket's address where
 * the first send is seen at sock:sock_send_length (EA_UDP_SEND_TP: a raw
 * tracepoint, whose argument is that address), else by socket cookie. */
BPF_TABLE("lru_hash", u64, struct ea_connect_event, udp_connected, 16384);
#define EA_UDP_CONNECTED 1 /* sk_state of a connected UDP socket (TCP_ESTABLISHED) */

static __always_inline u64 pending_key(struct bpf_sock_addr *ctx)
{
#ifdef EA_UDP_SEND_TP
    struct bpf_sock *sk = ctx->sk;
    return (u64)sk; /* used as a number, never read through */
#else
    return bpf_get_socket_cookie(ctx);
#endif
}

/* Peers that sent a datagram to a socket: a send back to them is a reply
 * (a resolver or NTP server answering), not a new destination. */
struct ea_udp_peer {
    u64 cookie;
    u8 addr[16];
    u16 port;
    u8 family;
    u8 _pad[5];
};
BPF_TABLE("lru_hash", struct ea_udp_peer, u64, udp_peers, 16384);

static __always_inline int is_reply(u64 cookie, struct ea_connect_event *ev)
{
    struct ea_udp_peer peer = {.cookie = cookie, .port = ev->dport, .family = ev->family};
    __builtin_memcpy(peer.addr, ev->daddr, sizeof(peer.addr));
    return udp_peers.lookup(&peer) != NULL;
}

/* A connect or send seen at a sock_addr hook (cgroup_hooks.bpf.c calls this for
 * connect4/6). UDP: sends count at once, connects once their first datagram
 * leaves. TCP is looked at only to know who owns a DNS-over-TCP socket. */
static __always_inline void udp_sock_addr(struct bpf_sock_addr *ctx, u32 protocol, int v6, int is_connect)
{
    struct ea_connect_event ev = {};
    if (protocol != IPPROTO_UDP && protocol != IPPROTO_TCP)
        return;
    if (protocol == IPPROTO_TCP && ntohs((u16)ctx->user_port) != EA_DNS_PORT)
        return;
#ifndef EA_DNS
    if (protocol == IPPROTO_TCP)
        return;
#endif
    fill_sock_addr(&ev, ctx, (u8)protocol, v6);
    if (protocol == IPPROTO_UDP) {
        u64 cookie = bpf_get_socket_cookie(ctx);
#ifdef EA_UDP_SEND_TP
        /* An unconnected socket sending to an address may sit where a closed
         * socket's pending connect was left (the kernel reuses the memory):
         * that entry is not this socket's. A connected socket keeps its own. */
        if (!is_connect && ctx->sk->state != EA_UDP_CONNECTED) {
            u64 stale = pending_key(ctx);
            udp_connected.delete(&stale);
        }
#endif
        if (is_connect) {
            u64 key = pending_key(ctx);
            fill_identity(&ev);
            udp_connected.update(&key, &ev);
        } else if (!is_reply(cookie, &ev)) {
            fill_identity(&ev);
            count_flow(ctx, &ev, 1);
        }
    }
#ifdef EA_DNS
    if (ev.dport == EA_DNS_PORT) {
        if (ev.pid == 0) /* TCP, or a reply not counted above */
            fill_identity(&ev);
        remember_dns_owner(bpf_get_socket_cookie(ctx), &ev);
    }
#endif
}

/* Every program returns 1: an auditor never refuses a connection. */
int udp_sendmsg4(struct bpf_sock_addr *ctx)
{
    udp_sock_addr(ctx, ctx->protocol, 0, 0);
    return 1;
}

int udp_sendmsg6(struct bpf_sock_addr *ctx)
{
    udp_sock_addr(ctx, ctx->protocol, 1, 0);
    return 1;
}

/* A connected socket's first send: its pending connect becomes a flow, once. */
static __always_inline void count_pending(void *ctx, u64 key, int coarse)
{
    struct ea_connect_event *pending = udp_connected.lookup(&key);
    if (!pending)
        return;
    struct ea_connect_event ev = *pending;
    udp_connected.delete(&key);
    count_flow(ctx, &ev, coarse);
}

#ifdef EA_UDP_SEND_TP
/* The first send on a connected UDP socket makes it a flow. A raw tracepoint
 * at the end of every sendmsg of every socket (6.3+): one lookup in a small
 * map, where a cgroup_skb egress program would run for every packet,
 * acknowledgements included. Only the socket's address and the result are
 * read (the tracepoint's arguments), never the socket. */
RAW_TRACEPOINT_PROBE(sock_send_length)
{
    u64 key = ctx->args[0];
    int sent = (int)ctx->args[1];
    if (sent > 0)
        count_pending(ctx, key, 0);
    return 0;
}

#else
/* The first datagram a connected UDP socket sends makes it a flow. */
int udp_egress(struct __sk_buff *skb)
{
    struct ea_skb_head head = {};
    if (!skb_head(skb, &head) || head.proto != IPPROTO_UDP)
        return 1;
    count_pending(skb, bpf_get_socket_cookie(skb), 1);
    return 1;
}
#endif

/* The source of a datagram that a socket reads with its address (recvfrom,
 * recvmsg with a name): a send back to it is a reply (see is_reply). These
 * hooks run per read of a UDP socket; a cgroup_skb program would run for
 * every packet of every socket, TCP included. */
static __always_inline int note_peer(struct bpf_sock_addr *ctx, int v6)
{
    struct ea_connect_event source = {};
    fill_sock_addr(&source, ctx, IPPROTO_UDP, v6);
    struct ea_udp_peer peer = {.port = source.dport, .family = source.family};
    __builtin_memcpy(peer.addr, source.daddr, sizeof(peer.addr));
    peer.cookie = bpf_get_socket_cookie(ctx);
    /* A known peer stays: a lookup is cheaper than an update for every datagram. */
    if (!udp_peers.lookup(&peer)) {
        u64 now = bpf_ktime_get_ns();
        udp_peers.update(&peer, &now);
    }
    return 1;
}

int udp_recvmsg4(struct bpf_sock_addr *ctx) { return note_peer(ctx, 0); }
int udp_recvmsg6(struct bpf_sock_addr *ctx) { return note_peer(ctx, 1); }
#endif /* EA_UDP_CGROUP */

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

/* A destination read from a sockaddr in user memory; 0 if not AF_INET{,6}. */
static __always_inline int read_destination(struct ea_connect_event *ev, const void *uaddr, int len)
{
    struct sockaddr_in6 sin6 = {};
    if (!uaddr || len < (int)sizeof(struct sockaddr_in))
        return 0;
    bpf_probe_read_user(&sin6, sizeof(struct sockaddr_in), uaddr);
    if (sin6.sin6_family == EA_AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&sin6;
        fill_v4(ev, IPPROTO_UDP, sin->sin_addr.s_addr, sin->sin_port);
        return 1;
    }
    if (sin6.sin6_family == EA_AF_INET6 && len >= (int)sizeof(sin6)) {
        bpf_probe_read_user(&sin6, sizeof(sin6), uaddr);
        fill_v6(ev, IPPROTO_UDP, sin6.sin6_addr.s6_addr, sin6.sin6_port);
        return 1;
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
    struct ea_connect_event ev = {};
    if (read_destination(&ev, args->addr, args->addr_len))
        record_connect(args, &ev, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{
    struct user_msghdr msg = {};
    struct ea_connect_event ev = {};
    if (bpf_probe_read_user(&msg, sizeof(msg), args->msg) != 0)
        return 0;
    if (read_destination(&ev, msg.msg_name, msg.msg_namelen))
        record_connect(args, &ev, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    struct ea_pending_connect pending = {};
    if (!read_destination(&pending.ev, args->uservaddr, args->addrlen))
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    pending_connects.update(&tid, &pending);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ea_pending_connect *pending = pending_connects.lookup(&tid);
    if (!pending)
        return 0;
    /* A datagram connect returns 0 at once and never changes TCP state. */
    if (args->ret == 0 && !pending->is_tcp) {
        struct ea_connect_event ev = pending->ev;
        record_connect(args, &ev, 0);
    }
    pending_connects.delete(&tid);
    return 0;
}
#endif /* EA_UDP_SYSCALLS */
