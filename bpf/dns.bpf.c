/* DNS answers arriving at local sockets, copied to user space to learn the
 * names behind addresses. A cgroup_skb ingress program at the cgroup v2 root:
 * it sees every packet delivered to a local socket, so it filters on the
 * source port first and returns 1 (deliver) always. UDP answers and TCP
 * answers whose message fits in one segment are copied. */

BPF_RINGBUF_OUTPUT(dns_events, EA_RINGBUF_PAGES);

int dns_ingress(struct __sk_buff *skb)
{
    u8 first = 0;
    u32 l4 = 0;
    u8 family;
    u8 proto = skb_l4_protocol(skb, &first);
    if (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
        return 1;
    if ((first >> 4) == 4) {
        family = EA_AF_INET;
        l4 = (first & 0x0f) * 4;
    } else {
        family = EA_AF_INET6;
        l4 = 40; /* extension headers before UDP/TCP are not followed */
    }
    if (ntohs(skb_sport_be(skb, l4)) != EA_DNS_PORT)
        return 1;

    u32 payload;
    u16 msg_len = 0;
    if (proto == IPPROTO_UDP) {
        payload = l4 + 8;
    } else {
        u8 offset = 0;
        u16 prefix_be = 0;
        if (bpf_skb_load_bytes(skb, l4 + 12, &offset, 1) != 0)
            return 1;
        payload = l4 + (offset >> 4) * 4;
        /* DNS over TCP: a two-byte length, then the message. */
        if (bpf_skb_load_bytes(skb, payload, &prefix_be, 2) != 0)
            return 1;
        msg_len = ntohs(prefix_be);
        payload += 2;
    }
    if (skb->len < payload + 12) /* shorter than a DNS header: no answer */
        return 1;
    u64 len = skb->len - payload;
    if (proto == IPPROTO_UDP)
        msg_len = len;

    struct ea_dns_event *ev = dns_events.ringbuf_reserve(sizeof(struct ea_dns_event));
    if (!ev) {
        count_stat(EA_STAT_EVENTS_LOST);
        return 1;
    }
    /* At most EA_DNS_MAX - 1 bytes, bounded where the verifier can see it:
     * the empty asm keeps the compiler from folding the mask away. */
    if (len > EA_DNS_MAX - 1)
        len = EA_DNS_MAX - 1;
    asm volatile("%[len] &= %[mask]" : [len] "+r"(len) : [mask] "i"(EA_DNS_MAX - 1));
    if (len == 0) {
        dns_events.ringbuf_discard(ev, 0);
        return 1;
    }
    if (bpf_skb_load_bytes(skb, payload, ev->data, len) != 0) {
        dns_events.ringbuf_discard(ev, 0);
        return 1;
    }
    ev->ts_ns = bpf_ktime_get_ns();
    ev->cookie = bpf_get_socket_cookie(skb);
    ev->len = len;
    ev->msg_len = msg_len;
    ev->family = family;
    ev->protocol = proto;
    ev->pid = 0;
    ev->uid = 0;
    __builtin_memset(ev->comm, 0, sizeof(ev->comm));
    struct ea_dns_owner *owner = dns_owners.lookup(&ev->cookie);
    if (owner) {
        ev->pid = owner->pid;
        ev->uid = owner->uid;
        __builtin_memcpy(ev->comm, owner->comm, sizeof(ev->comm));
    }
    dns_events.ringbuf_submit(ev, 0);
    return 1;
}
