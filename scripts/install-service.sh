#!/usr/bin/env bash
# Install egress-auditor as a systemd service: the tool in its own virtual
# environment under /opt/egress-auditor (outside /home, which the service
# cannot see), the unit, and its options in /etc/default/egress-auditor (an
# existing one is kept: it holds the operator's choices). Run scripts/setup.sh
# first (BCC, kernel headers). Then: systemctl enable --now egress-auditor.
#   --root DIR   install under DIR instead of / (to inspect or package it)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
root=""
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --root=*) root=${1#--root=}; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-service: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done
say() { printf 'install-service: %s\n' "$*" >&2; }

if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  say "must run as root (try: sudo $0)"; exit 1
fi

venv="$root/opt/egress-auditor"
units="$root/etc/systemd/system"
defaults="$root/etc/default"

say "installing egress-auditor into $venv (system site packages, for Debian's BCC bindings)"
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --upgrade "$here"

say "installing $units/egress-auditor.service"
install -D -m 0644 "$here/packaging/systemd/egress-auditor.service" "$units/egress-auditor.service"
if [ -e "$defaults/egress-auditor" ]; then
  say "keeping $defaults/egress-auditor (the shipped one is $here/packaging/systemd/egress-auditor.env)"
else
  say "installing $defaults/egress-auditor"
  install -D -m 0644 "$here/packaging/systemd/egress-auditor.env" "$defaults/egress-auditor"
fi

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  say "ready: systemctl enable --now egress-auditor; journalctl -u egress-auditor -f"
else
  say "installed under ${root:-/}; systemd is not running here: nothing was enabled"
fi
