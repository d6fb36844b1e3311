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

export DEBIAN_FRONTEND=noninteractive
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
updated=""
apt_install() {
  [ -n "$updated" ] || { apt-get update -qq; updated=1; }
  say "installing Debian packages: $*"
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

packages=(python3-bpfcc bpfcc-tools python3-venv python3-pip iptables nftables iproute2
          curl wget gcc make libc6-dev procps util-linux netbase dnsmasq-base iputils-ping bpftool
          systemd)
missing=()
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

# Headers of the running kernel when the distribution has them (stock kernels,
# the Vagrant box); otherwise the distribution's current headers, linked below.
release=$(uname -r)
if [ ! -e "/lib/modules/$release/build/include" ] && ! installed "linux-headers-$release"; then
  [ -n "$updated" ] || { apt-get update -qq; updated=1; }
  if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
    apt_install "linux-headers-$release"
  else
    meta="linux-headers-$(dpkg --print-architecture)"
    installed "$meta" || apt_install "$meta"
  fi
fi

# BCC compiles against /lib/modules/$(uname -r)/build; a kernel without its
# own headers package (VMs, CI) gets the distribution's headers linked there.
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/include" ]; then
  build=$(ls -d /usr/src/linux-headers-*-"$(dpkg --print-architecture)" 2>/dev/null | sort -V | tail -n 1 || true)
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
