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
/* No counter of all connects: each is counted once in its flow (count line
 * or flow map) or as EA_STAT_MAP_FULL, and a per-CPU counter cost 20 ns. */
#define EA_STAT_EVENTS_LOST 0 /* events the buffer could not take */
#define EA_STAT_MAP_FULL 1    /* connects that found the flow map full */
#define EA_STAT_SLOTS 2

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
    u64 fp;        /* the key's fingerprint, two words (EA_COUNT_LINES), else 0 */
    u64 fp2;
};

/* Count lines (flow_map.bpf.c): repeats of a flow that user space gave a
 * slot, by fingerprint, are counted there. A line is one 64-byte cache line. */
#define EA_LINE_SLOTS 2
struct ea_count_slot {
    u64 fp;        /* written by user space only, after fp2; 0: free */
    u64 fp2;
    u64 count;     /* repeats counted here, besides the flow map's count */
    u64 last_ns;
};
struct ea_count_line {
    struct ea_count_slot slot[EA_LINE_SLOTS];
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
    u8 _pad[2];
    u32 epoch;     /* EA_EVENT_NEW_FLOW: the flow map generation it was counted in */
    u8 saddr[16];
    u8 daddr[16];
    char comm[16];
};

/* DNS answers seen arriving at local sockets (bpf/dns.bpf.c). */
#ifndef EA_DNS_PORT
#define EA_DNS_PORT 53
#endif
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

/* ---- Process lineage (bpf/process.bpf.c, egress_auditor/attribution/lineage_tracer.py) ---- */
#define EA_PROC_FORK 1 /* a new process (not a thread); pid is the child */
#define EA_PROC_EXEC 2 /* pid now runs filename with args */
#define EA_PROC_EXIT 3 /* the last thread of pid exited */

#ifndef EA_FILENAME_SIZE
#define EA_FILENAME_SIZE 256
#endif
#ifndef EA_ARGS_SIZE
#define EA_ARGS_SIZE 512 /* a power of two: NUL-separated argv, cut beyond */
#endif
#define EA_MAX_ARGS 32

/* Flags of a process event. */
#define EA_PROC_ARGS_CUT 1     /* argv had more than EA_ARGS_SIZE bytes (or EA_MAX_ARGS words: syscall path) */
#define EA_PROC_ARGS_MISSING 2 /* argv could not be read */
#define EA_PROC_FILENAME_CUT 4

/* Slots of the lineage statistics array. */
#define EA_PSTAT_EVENTS 0 /* process events sent */
#define EA_PSTAT_LOST 1   /* process events the ring buffer could not take */
#define EA_PSTAT_SLOTS 2

/* One record per fork, exec or exit. FORK and EXIT records end before
 * filename (the record is cut at offsetof(filename)): only EXEC carries it. */
struct ea_process_event {
    u64 ts_ns;        /* bpf_ktime_get_ns(), CLOCK_MONOTONIC */
    u64 cgroup_id;    /* cgroup v2 id of the task that caused the event */
    u64 clone_flags;  /* FORK: the clone flags */
    u32 kind;         /* EA_PROC_* */
    u32 pid;          /* FORK: the child; EXEC, EXIT: the process */
    u32 tid;          /* the thread that caused the event */
    u32 ppid;         /* FORK: the process that forked */
    u32 uid;
    u32 gid;
    u32 flags;        /* EA_PROC_ARGS_CUT ... */
    u16 args_size;    /* EXEC: bytes used in args */
    u16 argc;         /* EXEC: words in args */
    char comm[16];
    char filename[EA_FILENAME_SIZE];
    char args[EA_ARGS_SIZE];
};
/* ---- end of process lineage ---- */

#endif
