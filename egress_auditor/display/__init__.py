"""What the person running a trace watches on stderr.

In: `Connection` events and the `FlowTable`. Out: a live rich table, or one escaped line per new flow.
"""
