/* DNS answers arriving at local sockets, copied to user space to learn the
 * names behind addresses, from the cgroup_skb ingress program at the cgroup
 * v2 root: it sees every packet delivered to a local socket, so this filters
 * on the source port first. UDP answers and TCP answers whose message fits
 * in one segment are copied. Follows flow_map.bpf.c (count_stat) and comes
 * before udp_send.bpf.c, whose hooks tell which process owns a DNS socket. */
#include "uapi.bpf.h"
#include "skb.bpf.h"

#ifndef EA_DNS_PAGES
#define EA_DNS_PAGES EA_RINGBUF_PAGES
#endif

/* Reserved in place, which only a ring buffer offers: the plan turns DNS names
 * on only with the ring buffer (inputs/ebpf/plan.py). */
BPF_RINGBUF_OUTPUT(dns_events, EA_DNS_PAGES);

/* Sockets that talk to port 53, so their answers can be tied to a process. */
BPF_TABLE("lru_hash", u64, struct ea_dns_owner, dns_owners, 8192);

/* Called by the sock_addr hooks (udp_send.bpf.c) for UDP and TCP to port 53. */
static __always_inline void remember_dns_owner(u64 cookie, struct ea_connect_event *ev)
{
    struct ea_dns_owner owner = {.pid = ev->pid, .uid = ev->uid};
    __builtin_memcpy(owner.comm, ev->comm, sizeof(owner.comm));
    dns_owners.update(&cookie, &owner);
}

/* Copy a DNS answer (source port 53) to user space; called by the one
 * ingress program in cgroup_hooks.bpf.c for every UDP and TCP packet delivered. */
static __always_inline void dns_copy_answer(struct __sk_buff *skb, struct ea_skb_head *head)
{
    u32 l4 = head->l4;
    u8 proto = head->proto;
    if (head->sport != EA_DNS_PORT)
        return;

    u32 payload;
    u16 msg_len = 0;
    if (proto == IPPROTO_UDP) {
        payload = l4 + 8;
    } else {
        u8 offset = 0;
        u16 prefix_be = 0;
        if (bpf_skb_load_bytes(skb, l4 + 12, &offset, 1) != 0)
            return;
        payload = l4 + (offset >> 4) * 4;
        /* DNS over TCP: a two-byte length, then the message. */
        if (bpf_skb_load_bytes(skb, payload, &prefix_be, 2) != 0)
            return;
        msg_len = ntohs(prefix_be);
        payload += 2;
    }
    if (skb->len < payload + 12) /* shorter than a DNS header: no answer */
        return;
    u64 len = skb->len - payload;
    if (proto == IPPROTO_UDP)
        msg_len = len;

    struct ea_dns_event *ev = dns_events.ringbuf_reserve(sizeof(struct ea_dns_event));
    if (!ev) {
        count_stat(EA_STAT_EVENTS_LOST);
        return;
    }
    /* At most EA_DNS_MAX - 1 bytes, bounded where the verifier can see it:
     * the empty asm keeps the compiler from folding the mask away. */
    if (len > EA_DNS_MAX - 1)
        len = EA_DNS_MAX - 1;
    asm volatile("%[len] &= %[mask]" : [len] "+r"(len) : [mask] "i"(EA_DNS_MAX - 1));
    /* Never true (checked above, but the asm hides it); an ordered comparison, where `len == 0`
     * would do, gives 6.1's verifier the lower bound bpf_skb_load_bytes needs (no zero size). */
    if (len < 12) {
        dns_events.ringbuf_discard(ev, 0);
        return;
    }
    if (bpf_skb_load_bytes(skb, payload, ev->data, len) != 0) {
        dns_events.ringbuf_discard(ev, 0);
        return;
    }
    /* The key is looked up from the stack: 6.1's verifier takes no ring buffer memory as a map key. */
    u64 cookie = bpf_get_socket_cookie(skb);
    ev->ts_ns = bpf_ktime_get_ns();
    ev->cookie = cookie;
    ev->len = len;
    ev->msg_len = msg_len;
    ev->family = head->family;
    ev->protocol = proto;
    ev->pid = 0;
    ev->uid = 0;
    __builtin_memset(ev->comm, 0, sizeof(ev->comm));
    struct ea_dns_owner *owner = dns_owners.lookup(&cookie);
    if (owner) {
        ev->pid = owner->pid;
        ev->uid = owner->uid;
        __builtin_memcpy(ev->comm, owner->comm, sizeof(ev->comm));
    }
    dns_events.ringbuf_submit(ev, 0);
}
