#!/usr/bin/env bash
# Build the deb and rpm (packaging/build.sh), check them (lintian; rpm -qpl, --scripts,
# --requires, and an install into a scratch root), then run the VM test with the .deb.
# Part of tests/run-all.sh; needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '==> %s\n' "$*"; }

need=()
command -v lintian >/dev/null || need+=(lintian)
command -v rpm >/dev/null || need+=(rpm)
if ((${#need[@]})); then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

packaging/build.sh
deb=$(ls -t target/debian/clawnode_*.deb | head -1)
rpm=$(ls -t target/generate-rpm/clawnode-*.rpm | head -1)
# The same package at a higher Debian revision, for the VM's upgrade check. cargo-deb clears
# target/debian on each run, so the first package is kept aside.
rm -rf target/vm-debs && mkdir -p target/vm-debs
cp "$deb" target/vm-debs/
deb=target/vm-debs/$(basename "$deb")
cargo deb --no-build --locked --deb-version "$(dpkg-deb -f "$deb" Version | sed 's/-\([0-9]*\)$//')-99" --output target/vm-debs/upgrade/
upgrade=$(ls target/vm-debs/upgrade/clawnode_*.deb)

log "lintian $deb"
# Errors fail the build; warnings are printed for the record.
lintian --tag-display-limit 0 "$deb" | tee target/lintian.txt || true
if grep -q '^E:' target/lintian.txt; then
  echo "lintian reported errors" >&2
  exit 1
fi
echo "lintian: $(grep -c '^E:' target/lintian.txt) errors, $(grep -c '^W:' target/lintian.txt) warnings"

log "rpm $rpm"
rpm -qpl "$rpm"
rpm -qp --scripts "$rpm"
rpm -qp --requires "$rpm"
rpm -qp --configfiles "$rpm" | grep -qx /etc/clawbernetes/clawbernetes.toml
scratch=$(mktemp -d)
rpm --root "$scratch" --initdb
rpm --root "$scratch" -i --nodeps --noscripts "$rpm"
test -x "$scratch/usr/bin/clawnode"
test "$(stat -c %a "$scratch/etc/clawbernetes/clawbernetes.toml")" = 600
test -f "$scratch/usr/lib/systemd/system/clawnode.service"
grep -qx 'u clawbernetes - "Clawbernetes node agent"' "$scratch/usr/lib/sysusers.d/clawnode.conf"
test -f "$scratch/usr/share/clawnode/tailscale-root.conf"
rpm -qp --scripts "$rpm" | grep -q 'systemd-sysusers clawnode.conf'
rm -rf "$scratch"
echo "rpm: installs into a scratch root with the binary, the unit, the sysusers.d file, the drop-in and the 0600 config"

log "VM test (Debian bookworm under QEMU/TCG, kernel WireGuard, systemd)"
# The path of the executable named $1 that `cargo <rest>` builds; fails loudly without one,
# so that the guest never skips a part silently.
executable() {
  local name=$1 path
  shift
  path=$(cargo "$@" --message-format=json 2>/dev/null \
    | sed -n "s/.*\"executable\":\"\\([^\"]*$name[^\"]*\\)\".*/\\1/p" | tail -1)
  [[ -x $path ]] || { echo "no $name executable from cargo $*" >&2; return 1; }
  echo "$path"
}
bench=$(executable bench_peers test --locked --release --features test-fakes --test bench_peers --no-run)
# test-fakes only so that the library built for the tests is reused.
standin=$(executable tailscaled-standin build --locked --features test-fakes --example tailscaled-standin)
tests/vm/run.sh "$deb" "$bench" "$upgrade" "$standin"
