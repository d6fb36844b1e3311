#!/bin/sh
# Runs inside the VM (scripts/vm_test.py): pytest on tests/vm (mode test) or bench/path_cost.py
# (mode bench), its output and exit status into the folder $1.
out=$1; mode=$2; shift 2
date +%s.%N > "$out/started"
cd "$(dirname "$0")/../.." || exit 1
ip link set lo up 2>/dev/null
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
# The root file system is read-only here: no bytecode or pytest cache is written.
export PYTHONDONTWRITEBYTECODE=1 EGRESS_AUDITOR_VM_KERNEL="$(uname -r)"
if [ "$mode" = bench ]; then
  .venv/bin/python bench/path_cost.py > "$out/pytest.log" 2>&1
else
  .venv/bin/pytest -p no:cacheprovider -p no:hypothesispytest -ra -v tests/vm "$@" > "$out/pytest.log" 2>&1
fi
echo $? > "$out/status"
