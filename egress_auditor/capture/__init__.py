"""Flows and captures: what a run saw, kept and read back.

In: enriched `Connection` events, or capture files (JSON Lines). Out: `Flow`s in a `FlowTable`, capture
records, and what captures cover (baseline), drift from them, and the diff of two captures.
"""
