/* What the cgroup_skb programs read of a packet: its IP header and L4 source port. */
#ifndef EGRESS_AUDITOR_SKB_BPF_H
#define EGRESS_AUDITOR_SKB_BPF_H

#include "events.h"

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

#endif
