#!/usr/bin/env bash
# Provision a Debian/Ubuntu host (or CI runner) for egress-auditor: packages,
# kernel headers link for BCC, tracefs, and a virtual environment.
# Every step is printed; nothing here runs when the tool itself starts.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
say() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "must run as root (try: sudo $0)"; exit 1
fi

packages=(python3-bpfcc bpfcc-tools python3-venv python3-pip linux-headers-amd64
          iptables nftables iproute2 curl wget gcc make libc6-dev procps)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# BCC compiles against /lib/modules/$(uname -r)/build; a kernel without its
# own headers package (VMs, CI) gets the distribution's headers linked there.
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/include" ]; then
  build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$build" ]; then
    say "no kernel headers under /usr/src; install linux-headers-\$(uname -r) or linux-headers-amd64"; exit 1
  fi
  say "linking $kdir/build -> $build (test-host provisioning)"
  mkdir -p "$kdir"
  ln -sfn "$build" "$kdir/build"
  [ -n "$common" ] && ln -sfn "$common" "$kdir/source"
fi

if ! mountpoint -q /sys/kernel/tracing; then
  say "mounting tracefs at /sys/kernel/tracing"
  mount -t tracefs tracefs /sys/kernel/tracing
fi

if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv (system site packages, for Debian's BCC bindings)"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
extras=${EGRESS_AUDITOR_EXTRAS:-test}
say "installing egress-auditor[$extras] into $venv"
"$venv/bin/pip" install -q --disable-pip-version-check -e "$here[$extras]"
ln -sfn "$venv/bin/egress-auditor" /usr/local/bin/egress-auditor
say "ready: $(command -v egress-auditor)"
