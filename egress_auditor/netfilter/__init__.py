"""What the netfilter inputs (nflog, nfqueue) share: the netlink protocol
(netlink.py), packet parsing (packets.py) and the firewall rules they install
and remove (rules.py)."""
