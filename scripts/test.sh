#!/usr/bin/env bash
# Provision this host (scripts/setup.sh), then run the linter and every test:
# unit tests, kernel tests that load BPF and use network namespaces, and the
# VM stage (scripts/vm_test.py: Debian's stock kernels under QEMU) where QEMU can run.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
cd "$here"
echo "== ruff"
.venv/bin/ruff check .
echo "== pytest"
set +e
.venv/bin/pytest -ra "$@"
status=$?
set -e
# pytest's 5 means no test ran: that is a failure here, never a pass.
[ "$status" -eq 5 ] && echo "no tests were collected" >&2
echo "== VM stage (stock kernels; EGRESS_AUDITOR_VM=off leaves it out)"
set +e
if [ $# -eq 0 ]; then
  .venv/bin/python scripts/vm_test.py
  vm_status=$?
else
  echo "vm: VM stage not run: pytest arguments given (scripts/vm_test.py runs it alone)" >&2
  vm_status=3
fi
set -e
# 3: this machine cannot run it, and vm_test.py has said why in one line. In CI that hides
# the stock kernels' paths, so it fails there unless EGRESS_AUDITOR_VM=off asked for it.
if [ "$vm_status" -eq 3 ]; then
  if [ -n "${CI:-}" ] && [ $# -eq 0 ] && [ "${EGRESS_AUDITOR_VM:-}" != off ]; then
    echo "vm: CI must run the VM stage (EGRESS_AUDITOR_VM=off to leave it out on purpose)" >&2
    vm_status=1
  else
    vm_status=0
  fi
fi
[ "$status" -ne 0 ] && exit "$status"
exit "$vm_status"
