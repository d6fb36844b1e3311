"""From flows to firewall rules.

In: `Flow`s (a run's or captures'). Out: `Rule`s scoped, aggregated and filtered by review, the policy
around them (accept, drop, audit) and the `#` lines that say where each came from, for the firewall outputs.
"""
