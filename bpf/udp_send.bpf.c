/* UDP destinations, counted per flow in the kernel like TCP connects.
 * Paths, chosen at compile time:
 *   EA_UDP_CGROUP    cgroup sock_addr hooks connect4/6 and sendmsg4/6 at the
 *                    cgroup v2 root: connected and unconnected sockets.
 *   EA_UDP_SYSCALLS  syscall tracepoints (kernels without those hooks):
 *                    sendto/sendmsg with an address, and connect() that
 *                    returned 0 without the TCP tracepoint firing in between.
 * Both read only stable interfaces: struct bpf_sock_addr, tracepoint
 * arguments and uapi structs in user memory. */


static __always_inline void fill_v4(struct ea_connect_event *ev, u32 daddr, u16 dport_be)
{
    ev->protocol = IPPROTO_UDP;
    ev->family = EA_AF_INET;
    ev->dport = ntohs(dport_be);
    __builtin_memcpy(ev->daddr, &daddr, 4);
}

/* IPv6, with IPv4-mapped destinations keyed as the IPv4 they are on the wire. */
static __always_inline void fill_v6(struct ea_connect_event *ev, const u8 *daddr, u16 dport_be)
{
    ev->protocol = IPPROTO_UDP;
    ev->dport = ntohs(dport_be);
    if (is_v4_mapped(daddr)) {
        ev->family = EA_AF_INET;
        __builtin_memcpy(ev->daddr, &daddr[12], 4);
    } else {
        ev->family = EA_AF_INET6;
        __builtin_memcpy(ev->daddr, daddr, 16);
    }
}

#ifdef EA_UDP_CGROUP
/* Every program here returns 1: an auditor never refuses a connection. */
static __always_inline int on_sock_addr(struct bpf_sock_addr *ctx, int v6)
{
    struct ea_connect_event ev = {};
    if (v6) {
        u32 words[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
        fill_v6(&ev, (const u8 *)words, (u16)ctx->user_port);
    } else {
        fill_v4(&ev, ctx->user_ip4, (u16)ctx->user_port);
    }
    if (ctx->protocol == IPPROTO_UDP) {
        record_connect(ctx, &ev);
    }
#ifdef EA_DNS
    else if (ctx->protocol == IPPROTO_TCP && ev.dport == EA_DNS_PORT) {
        /* TCP flows come from the TCP program; here only the DNS owner is kept. */
        u64 id = bpf_get_current_pid_tgid();
        u64 ids = bpf_get_current_uid_gid();
        ev.pid = id >> 32;
        ev.uid = (u32)ids;
        bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    }
    if (ev.dport == EA_DNS_PORT && (ctx->protocol == IPPROTO_UDP || ctx->protocol == IPPROTO_TCP))
        remember_dns_owner(bpf_get_socket_cookie(ctx), &ev);
#endif
    return 1;
}

int udp_connect4(struct bpf_sock_addr *ctx) { return on_sock_addr(ctx, 0); }
int udp_connect6(struct bpf_sock_addr *ctx) { return on_sock_addr(ctx, 1); }
int udp_sendmsg4(struct bpf_sock_addr *ctx) { return on_sock_addr(ctx, 0); }
int udp_sendmsg6(struct bpf_sock_addr *ctx) { return on_sock_addr(ctx, 1); }
#endif /* EA_UDP_CGROUP */

#ifdef EA_UDP_SYSCALLS
/* A destination read from a sockaddr in user memory; 0 if not AF_INET{,6}. */
static __always_inline int read_destination(struct ea_connect_event *ev, const void *uaddr, int len)
{
    struct sockaddr_in6 sin6 = {};
    if (!uaddr || len < (int)sizeof(struct sockaddr_in))
        return 0;
    bpf_probe_read_user(&sin6, sizeof(struct sockaddr_in), uaddr);
    if (sin6.sin6_family == EA_AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&sin6;
        fill_v4(ev, sin->sin_addr.s_addr, sin->sin_port);
        return 1;
    }
    if (sin6.sin6_family == EA_AF_INET6 && len >= (int)sizeof(sin6)) {
        bpf_probe_read_user(&sin6, sizeof(sin6), uaddr);
        fill_v6(ev, sin6.sin6_addr.s6_addr, sin6.sin6_port);
        return 1;
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
    struct ea_connect_event ev = {};
    if (read_destination(&ev, args->addr, args->addr_len))
        record_connect(args, &ev);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{
    struct user_msghdr msg = {};
    struct ea_connect_event ev = {};
    if (bpf_probe_read_user(&msg, sizeof(msg), args->msg) != 0)
        return 0;
    if (read_destination(&ev, msg.msg_name, msg.msg_namelen))
        record_connect(args, &ev);
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
        record_connect(args, &ev);
    }
    pending_connects.delete(&tid);
    return 0;
}
#endif /* EA_UDP_SYSCALLS */
