#!/bin/sh
# Runs inside the VM (scripts/vm_test.py): pytest on tests/vm, its output and status into $1.
out=$1; shift
date +%s.%N > "$out/started"
cd "$(dirname "$0")/../.." || exit 1
ip link set lo up 2>/dev/null
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
# The root file system is read-only here: no bytecode or pytest cache is written.
export PYTHONDONTWRITEBYTECODE=1 EGRESS_AUDITOR_VM_KERNEL="$(uname -r)"
.venv/bin/pytest -p no:cacheprovider -p no:hypothesispytest -ra -v tests/vm "$@" > "$out/pytest.log" 2>&1
echo $? > "$out/status"
