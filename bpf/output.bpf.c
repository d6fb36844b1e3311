/* Where connect events leave for user space, chosen here and nowhere else in
 * the kernel side: the BPF ring buffer with EA_USE_RINGBUF (5.8+), else a perf
 * buffer (user space opens the same: inputs/ebpf/input.py). The first piece
 * of the compile unit, joined rather than #included: BCC rewrites a map call
 * only where the main text spells it out, never in a header or a macro; and
 * it learns the record's type (user space's table.event) from the submit's
 * argument, so that is typed. */
#include "events.h"

#ifndef EA_RINGBUF_PAGES
#define EA_RINGBUF_PAGES 256
#endif

#ifdef EA_USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, EA_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

/* 0 once the buffer took the event. */
static __always_inline int submit_event(void *ctx, struct ea_connect_event *ev)
{
#ifdef EA_USE_RINGBUF
    return events.ringbuf_output(ev, sizeof(*ev), 0);
#else
    return events.perf_submit(ctx, ev, sizeof(*ev));
#endif
}
