/* The little the programs use of <uapi/linux/in.h> and <linux/socket.h>, as
 * their uapi defines it: those headers pull in much of the kernel's and cost
 * about 0.3 s of compiling at every start. */
#ifndef EGRESS_AUDITOR_UAPI_BPF_H
#define EGRESS_AUDITOR_UAPI_BPF_H

#include <uapi/linux/in6.h>

#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
struct sockaddr;
struct iovec;
struct sockaddr_in {
    unsigned short sin_family; /* __kernel_sa_family_t */
    __be16 sin_port;
    struct { __be32 s_addr; } sin_addr;
    unsigned char __pad[8];
};
struct user_msghdr {
    void *msg_name;
    int msg_namelen;
    struct iovec *msg_iov;
    __kernel_size_t msg_iovlen;
    void *msg_control;
    __kernel_size_t msg_controllen;
    unsigned int msg_flags;
};

#endif
