/* Structs shared by every egress-auditor BPF program and decoded by user
 * space through BCC (egress_auditor/inputs/ebpf.py reads field names only). */
#ifndef EGRESS_AUDITOR_EVENTS_H
#define EGRESS_AUDITOR_EVENTS_H

#define EA_AF_INET 2
#define EA_AF_INET6 10

/* Why an event crossed to user space. */
#define EA_EVENT_NEW_FLOW 1 /* first connect of a flow: the map holds its count */
#define EA_EVENT_MAP_FULL 2 /* flow map full: this connect is counted by user space */

/* Slots of the per-CPU statistics array. */
#define EA_STAT_CONNECTS 0    /* connects seen */
#define EA_STAT_EVENTS_LOST 1 /* events the buffer could not take */
#define EA_STAT_MAP_FULL 2    /* connects that found the flow map full */
#define EA_STAT_SLOTS 3

struct ea_flow_key {
    u8 daddr[16];  /* IPv4 in the first 4 bytes */
    u32 uid;
    u16 dport;     /* host byte order */
    u8 family;     /* EA_AF_INET or EA_AF_INET6 */
    u8 protocol;   /* IPPROTO_TCP, IPPROTO_UDP */
    char comm[16];
};

struct ea_flow_stats {
    u64 count;
    u64 first_ns;  /* bpf_ktime_get_ns(), CLOCK_MONOTONIC */
    u64 last_ns;
};

struct ea_connect_event {
    u64 ts_ns;
    u64 cgroup_id;
    u32 pid;       /* thread group id: the process */
    u32 tid;
    u32 uid;
    u32 gid;
    u32 flags;     /* EA_EVENT_* */
    u16 sport;     /* 0 when not yet chosen by the kernel */
    u16 dport;
    u8 family;
    u8 protocol;
    u8 _pad[6];
    u8 saddr[16];
    u8 daddr[16];
    char comm[16];
};

/* DNS answers seen arriving at local sockets (bpf/dns.bpf.c). */
#ifndef EA_DNS_MAX
#define EA_DNS_MAX 1024 /* a power of two: up to EA_DNS_MAX - 1 bytes of a DNS message are copied */
#endif

/* Who owns a socket that talks to port 53, recorded when it connects or sends. */
struct ea_dns_owner {
    u32 pid;
    u32 uid;
    char comm[16];
};

struct ea_dns_event {
    u64 ts_ns;
    u64 cookie;    /* socket cookie of the receiving socket */
    u32 pid;       /* owner of that socket, 0 when unknown */
    u32 uid;
    char comm[16];
    u16 len;       /* bytes in data */
    u16 msg_len;   /* length of the whole DNS message, when known */
    u8 family;
    u8 protocol;
    u8 _pad[2];
    u8 data[EA_DNS_MAX];
};

#endif
