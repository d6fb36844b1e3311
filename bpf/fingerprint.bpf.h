/* A flow key's fingerprint for the count lines (EA_COUNT_LINES, with the
 * twelve keys EA_FP_K0..EA_FP_K11). tests/fingerprint.py computes the same. */
#ifndef EGRESS_AUDITOR_FINGERPRINT_BPF_H
#define EGRESS_AUDITOR_FINGERPRINT_BPF_H

#include "events.h"

/* The key's fingerprint: two NH sums (Toeplitz: the second takes the keys
 * two words on) under 12 random 32-bit keys drawn at each start. NH is
 * 2^-32-almost-universal, so two distinct flow keys share both sums with
 * probability 2^-64 whatever the processes that name flows (comm) choose,
 * as long as they cannot read the keys; at about a third of SipHash's cost
 * here, which took most of what the count lines save. */
static __always_inline u64 nh_pair(u32 a, u32 b, u32 ka, u32 kb)
{
    return (u64)(u32)(a + ka) * (u64)(u32)(b + kb);
}

struct ea_fingerprint {
    u64 fp;
    u64 fp2;
};

static __always_inline struct ea_fingerprint flow_fingerprint(const struct ea_flow_key *key)
{
    u32 m[10];
    _Static_assert(sizeof(*key) == sizeof(m), "the key is ten 32-bit words");
    __builtin_memcpy(m, key, sizeof(m));
    struct ea_fingerprint f;
    f.fp = nh_pair(m[0], m[1], EA_FP_K0, EA_FP_K1) + nh_pair(m[2], m[3], EA_FP_K2, EA_FP_K3) +
           nh_pair(m[4], m[5], EA_FP_K4, EA_FP_K5) + nh_pair(m[6], m[7], EA_FP_K6, EA_FP_K7) +
           nh_pair(m[8], m[9], EA_FP_K8, EA_FP_K9);
    f.fp2 = nh_pair(m[0], m[1], EA_FP_K2, EA_FP_K3) + nh_pair(m[2], m[3], EA_FP_K4, EA_FP_K5) +
            nh_pair(m[4], m[5], EA_FP_K6, EA_FP_K7) + nh_pair(m[6], m[7], EA_FP_K8, EA_FP_K9) +
            nh_pair(m[8], m[9], EA_FP_K10, EA_FP_K11);
    if (!f.fp)
        f.fp = 1; /* 0 marks a free slot */
    return f;
}

#endif
