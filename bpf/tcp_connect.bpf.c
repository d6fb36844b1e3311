/* New outbound TCP connections, counted per flow in the kernel.
 * Attach path chosen at compile time:
 *   EA_PATH_KPROBE      kprobes on tcp_v4_connect / tcp_v6_connect
 *   EA_PATH_FENTRY      fentry (BPF trampolines) on the same functions
 *   EA_PATH_CGROUP      the cgroup connect4/6 hooks (cgroup_hooks.bpf.c)
 *   EA_PATH_TRACEPOINT  sock:inet_sock_set_state, CLOSE -> SYN_SENT
 * Follows flow_map.bpf.c and udp_send.bpf.c (mark_tcp_connect) in one
 * compile unit. Only stable interfaces are read: tracepoint fields, helpers
 * and uapi sockaddr structs, never struct sock (its layout varies by kernel
 * build). */
#include "uapi.bpf.h"
#include "addr.bpf.h"

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
#ifdef EA_UDP_SYSCALLS
    mark_tcp_connect();
#endif

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
    record_connect(args, &ev, 0);
    return 0;
}
#endif /* EA_PATH_TRACEPOINT */

#if defined(EA_PATH_KPROBE) || defined(EA_PATH_FENTRY)
/* The destination comes from the sockaddr the kernel copied from connect(2);
 * the source is not chosen yet at entry. */
static __always_inline int connect_v4(void *ctx, struct sockaddr *uaddr, int addr_len)
{
    struct sockaddr_in sin = {};
#ifdef EA_UDP_SYSCALLS
    mark_tcp_connect();
#endif
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
    record_connect(ctx, &ev, 0);
    return 0;
}

static __always_inline int connect_v6(void *ctx, struct sockaddr *uaddr, int addr_len)
{
    struct sockaddr_in6 sin6 = {};
#ifdef EA_UDP_SYSCALLS
    mark_tcp_connect();
#endif
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
    record_connect(ctx, &ev, 0);
    return 0;
}
#endif /* EA_PATH_KPROBE || EA_PATH_FENTRY */

#ifdef EA_PATH_KPROBE
int trace_v4(struct pt_regs *ctx, void *sk, struct sockaddr *uaddr, int addr_len)
{
    return connect_v4(ctx, uaddr, addr_len);
}

int trace_v6(struct pt_regs *ctx, void *sk, struct sockaddr *uaddr, int addr_len)
{
    return connect_v6(ctx, uaddr, addr_len);
}
#endif /* EA_PATH_KPROBE */

#ifdef EA_PATH_FENTRY
/* BCC attaches these at load (kfunc__ names); the arguments come typed from the kernel's BTF. */
KFUNC_PROBE(tcp_v4_connect, void *sk, struct sockaddr *uaddr, int addr_len)
{
    return connect_v4(ctx, uaddr, addr_len);
}

KFUNC_PROBE(tcp_v6_connect, void *sk, struct sockaddr *uaddr, int addr_len)
{
    return connect_v6(ctx, uaddr, addr_len);
}
#endif /* EA_PATH_FENTRY */

#ifdef EA_PATH_CGROUP
/* Called by the connect4/6 programs at the cgroup v2 root: once per connect()
 * of an unconnected socket, in the caller's context, before the route and the
 * source address are chosen (the source stays unknown). One run per connect,
 * where the tracepoint fires at every state change of both local ends. */
static __always_inline void tcp_sock_addr(struct bpf_sock_addr *ctx, int v6)
{
    struct ea_connect_event ev = {};
#ifdef EA_UDP_SYSCALLS
    mark_tcp_connect();
#endif
    fill_sock_addr(&ev, ctx, IPPROTO_TCP, v6);
    record_connect(ctx, &ev, 1);
}
#endif /* EA_PATH_CGROUP */
