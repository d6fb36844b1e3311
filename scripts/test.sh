#!/usr/bin/env bash
# Provision this host (scripts/setup.sh), then run the linter and every test:
# unit tests, and kernel tests that load BPF and use network namespaces.
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
exit "$status"
