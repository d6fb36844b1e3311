"""Benchmarks of egress-auditor: `sudo make bench` or `bench/run.py [--quick]`."""
