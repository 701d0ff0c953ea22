#!/usr/bin/env bash
# The VM test: a Debian bookworm guest booted with QEMU under TCG (KVM does not work on these
# machines), the freshly built .deb installed with dpkg, and two clawnode nodes on kernel
# WireGuard (the systemd service in the guest's root namespace, a second clawnode in a
# network namespace) driven through systemctl. The root image is cached under $VM_CACHE
# keyed on everything that builds it, so a warm run skips mmdebstrap.
# Usage: tests/vm/run.sh path/to/clawnode.deb [bench_peers test binary] [upgrade .deb]
#                        [tailscaled-standin]
#        (root; prints the guest's results; with the bench binary the guest also runs the
#        10,000-peer reconcile against kernel WireGuard next to `wg syncconf`; with a second
#        .deb of a higher version it also checks the upgrade path; with the stand-in
#        tailscaled it runs the unit on the tailscale provider with a LoadCredential= key)
#        The host's wireguard-go (bookworm's, like the guest) and the stand-in libnvidia-ml
#        (tests/nvml, built here) go along, for the userspace backend and NVML under the
#        unit's own user. VM_OLD_DEB=path: a package of the previous, root-run unit, installed
#        first so that the new one is checked as an upgrade from it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
deb=$(realpath "${1:?path to the clawnode .deb}")
cache=${VM_CACHE:-/var/cache/clawnode-vm}
out=$(mktemp -d /tmp/clawnode-vm.XXXXXX)
trap 'rm -rf "$out"' EXIT

log() { printf '==> [vm] %s\n' "$*"; }
started=$(date +%s)

for tool in qemu-system-x86_64 mmdebstrap mkfs.ext4; do
  command -v "$tool" >/dev/null || {
    log "installing qemu-system-x86 and mmdebstrap"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 mmdebstrap e2fsprogs
    break
  }
done

pkgs=systemd,systemd-sysv,udev,iproute2,wireguard-tools,kmod,dbus,ca-certificates,iputils-ping,procps,linux-image-cloud-amd64
key=$( (cat "$here/image.sh"; echo "$pkgs") | sha256sum | cut -c1-16)
image=$cache/$key
if [[ ! -f $image/root.img ]]; then
  log "building the root image (cold: mmdebstrap, about a minute)"
  # Only images this script built go: VM_CACHE may point at a shared directory.
  find "$cache" -mindepth 1 -maxdepth 1 -type d -name '[0-9a-f]*' ! -name "$key" -exec rm -rf {} + 2>/dev/null || true
  mkdir -p "$image"
  "$here/image.sh" "$image" "$pkgs"
else
  log "root image cached: $image"
fi

payload=$out/payload
mkdir -p "$payload/debs"
cp "$deb" "$payload/debs/"
cp "$here/guest.sh" "$payload/run.sh"
if [[ -n ${2:-} ]]; then
  mkdir -p "$payload/bench"
  cp "$2" "$payload/bench/bench_peers"
fi
if [[ -n ${3:-} ]]; then
  mkdir -p "$payload/upgrade"
  cp "$3" "$payload/upgrade/"
fi
if [[ -n ${4:-} ]]; then
  mkdir -p "$payload/standin"
  # Debug build, stripped: only the guest's 96 MB payload image cares about its size.
  objcopy --strip-debug "$4" "$payload/standin/tailscaled-standin"
fi
if command -v wireguard-go >/dev/null; then
  cp "$(command -v wireguard-go)" "$payload/wireguard-go"
fi
gcc -O2 -shared -fPIC -Wl,-soname,libnvidia-ml.so.1 -o "$payload/libnvidia-ml.so.1" "$here/../nvml/fake_nvml.c"
if [[ -n ${VM_OLD_DEB:-} ]]; then
  mkdir -p "$payload/old"
  cp "$VM_OLD_DEB" "$payload/old/"
fi
mkfs.ext4 -q -L E2EPAYLOAD -d "$payload" -E root_owner=0:0 "$out/payload.img" 96M

log "booting (TCG)"
booted=$(date +%s)
set +e
timeout -k 10 900 qemu-system-x86_64 -accel tcg,thread=multi -smp 2 -m 1536 \
  -nodefaults -no-reboot -display none -vga none \
  -kernel "$image/vmlinuz" \
  -append "root=/dev/nvme0n1 rootfstype=ext4 rw console=ttyS0 panic=-1 fsck.mode=skip e2e.run=1" \
  -drive if=none,id=root,file="$image/root.img",format=raw,snapshot=on -device nvme,drive=root,serial=e2eroot \
  -drive if=virtio,file="$out/payload.img",format=raw,readonly=on \
  -serial file:"$out/console.log" -serial file:"$out/results.log"
qemu_rc=$?
set -e
tr -d '\r' < "$out/results.log" | sed 's/^/    /'
rc=$(tr -d '\r' < "$out/results.log" | sed -n 's/^E2E-EXIT-CODE=\([0-9]*\).*/\1/p' | tail -1)
now=$(date +%s)
log "guest ran $((now - booted)) s; whole VM test $((now - started)) s (qemu exit $qemu_rc)"
if [[ -z $rc ]]; then
  log "no result line: the guest hung or panicked; console tail:"
  tr -d '\r' < "$out/console.log" | tail -40
  exit 1
fi
exit "$rc"
