"""Who made each connection.

In: `Connection` events as the inputs translated them. Out: the same events with their `Process`
(lineage, /proc, cgroup and service), command lines redacted, and the DNS name behind the address.
"""
