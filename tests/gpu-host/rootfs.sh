#!/usr/bin/env bash
# Build the Debian root filesystem that run.sh boots on a GPU host: bookworm with systemd,
# iproute2, wireguard-tools and wireguard-go, without docs, packed as one tar.xz (~33 MB).
# Usage: tests/gpu-host/rootfs.sh <out.tar.xz>
set -euo pipefail
out=${1:?out.tar.xz}
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v xz >/dev/null || need+=(xz-utils)
if ((${#need[@]})); then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mmdebstrap --variant=minbase --include=systemd,systemd-sysv,iproute2,wireguard-tools,wireguard-go,procps \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  bookworm "$root" "deb http://deb.debian.org/debian bookworm main"
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/*
tar -C "$root" -cf - . | xz -T0 -6 > "$out.partial"
mv "$out.partial" "$out"
