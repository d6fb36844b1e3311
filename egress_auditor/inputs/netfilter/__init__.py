"""What the netfilter inputs (nflog, nfqueue) share.

In: packets the kernel copies to an NFLOG group or NFQUEUE queue. Out: `Connection` events, the process
found through the packet's socket (sockets.py); netlink.py speaks nfnetlink, packets.py parses the copied
bytes, taps.py installs and removes the rules that copy them, reader.py is the thread that reads them.
"""
