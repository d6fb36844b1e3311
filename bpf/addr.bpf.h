/* A connect event's destination, from a cgroup hook's context or a sockaddr:
 * IPv4-mapped IPv6 keyed as the IPv4 it is on the wire. */
#ifndef EGRESS_AUDITOR_ADDR_BPF_H
#define EGRESS_AUDITOR_ADDR_BPF_H

#include "events.h"

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

#endif
