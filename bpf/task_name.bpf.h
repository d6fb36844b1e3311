/* A task's name read from its 16 bytes in task_struct (EA_TASK_COMM), made to
 * match what bpf_get_current_comm gives. */
#ifndef EGRESS_AUDITOR_TASK_NAME_BPF_H
#define EGRESS_AUDITOR_TASK_NAME_BPF_H

/* The bytes of a name word up to its first NUL, the rest zero; `more`: set
 * to 0 once a NUL is found. The lowest byte flagged by the zero-byte test is
 * the first NUL (a borrow only runs upward from it). */
static __always_inline u64 name_word(u64 word, u64 *more)
{
    u64 nul = (word - 0x0101010101010101ULL) & ~word & 0x8080808080808080ULL;
    u64 keep = nul ? ((nul & -nul) >> 7) - 1 : ~0ULL;
    word &= keep & *more;
    if (nul)
        *more = 0;
    return word;
}

/* A task's 16 name bytes as bpf_get_current_comm gives them: up to 15 bytes
 * to the first NUL, zero after (the kernel pads names with zeros when it
 * sets them, but the flow key must not depend on that). */
static __always_inline void task_name(u64 head, u64 tail, char *comm)
{
    u64 more = ~0ULL;
    head = name_word(head, &more);
    tail = name_word(tail, &more) & 0x00FFFFFFFFFFFFFFULL;
    __builtin_memcpy(&comm[0], &head, 8);
    __builtin_memcpy(&comm[8], &tail, 8);
}

#endif
