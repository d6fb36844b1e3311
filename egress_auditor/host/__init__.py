"""The machine the tool runs on.

In: the running kernel, /proc and /sys. Out: facts (what the host offers), the BPF sources and their
compile flags, task offsets from BTF, the few actions the tool takes on the host, and the `doctor` report.
"""
