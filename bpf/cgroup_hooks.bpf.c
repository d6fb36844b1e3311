/* The programs attached at the cgroup v2 root, one per hook: each serves
 * every feature compiled in (TCP connects on EA_PATH_CGROUP, UDP on
 * EA_UDP_CGROUP), because every program attached to a
 * hook runs for every connect or packet of the host. Follows the pieces whose
 * helpers it calls. All return 1: an auditor never refuses traffic. */
#include "uapi.bpf.h"
#include "skb.bpf.h"

#if defined(EA_PATH_CGROUP) || defined(EA_UDP_CGROUP)
static __always_inline int on_connect(struct bpf_sock_addr *ctx, int v6)
{
    u32 protocol = ctx->protocol;
#ifdef EA_PATH_CGROUP
    if (protocol == IPPROTO_TCP)
        tcp_sock_addr(ctx, v6);
#endif
#ifdef EA_UDP_CGROUP
    udp_sock_addr(ctx, protocol, v6, 1);
#endif
    return 1;
}

int connect4(struct bpf_sock_addr *ctx) { return on_connect(ctx, 0); }
int connect6(struct bpf_sock_addr *ctx) { return on_connect(ctx, 1); }
#endif

#ifdef EA_DNS
/* Every packet delivered to a local socket: answers from port 53 are copied. */
int ingress(struct __sk_buff *skb)
{
    struct ea_skb_head head = {};
    if (!skb_head(skb, &head))
        return 1;
    if (head.proto != IPPROTO_UDP && head.proto != IPPROTO_TCP)
        return 1;
    head.sport = ntohs(skb_sport_be(skb, head.l4));
    dns_copy_answer(skb, &head);
    return 1;
}
#endif
