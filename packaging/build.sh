#!/usr/bin/env bash
# Build the release binary and both packages, reproducibly: the timestamps come from the last
# commit (SOURCE_DATE_EPOCH), the build is --locked, and the man page and completions are
# generated from the binary itself. Installs cargo-deb and cargo-generate-rpm when missing.
# Usage: packaging/build.sh            -> target/debian/*.deb, target/generate-rpm/*.rpm
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
# Debug builds of the tools: they install in 2m50s instead of 8m40s on a 2-core machine
# and write byte-identical packages (compared with sha256sum); only their run is slower (s).
command -v cargo-deb >/dev/null || cargo install --debug --locked cargo-deb@3.8.0
command -v cargo-generate-rpm >/dev/null || cargo install --debug --locked cargo-generate-rpm@0.21.1

# The etcd store's gRPC client (default feature `store-etcd`) is generated with protoc.
if ! command -v protoc >/dev/null; then
  log "apt-get install protobuf-compiler"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends protobuf-compiler
fi
log "release binary"
cargo build --locked --release
log "man page and completions"
packaging/gen-docs.sh target/release/clawnode target/package-docs
touch -d "@$SOURCE_DATE_EPOCH" target/package-docs/man/* target/package-docs/completions/*

# cargo-generate-rpm clamps file times to SOURCE_DATE_EPOCH but keeps older ones, so a work
# tree whose files predate the last commit gave a different rpm than a fresh clone: raise
# those to the commit time (never lower a newer one).
for f in systemd/clawnode.service config/clawbernetes.toml README.md packaging/debian/copyright \
         packaging/systemd/clawnode.sysusers packaging/systemd/tailscale-root.conf; do
  [[ $(stat -c %Y "$f") -ge $SOURCE_DATE_EPOCH ]] || touch -d "@$SOURCE_DATE_EPOCH" "$f"
done

log "deb"
cargo deb --no-build --locked
log "rpm"
cargo generate-rpm

deb=$(ls -t target/debian/clawnode_*.deb | head -1)
rpm=$(ls -t target/generate-rpm/clawnode-*.rpm | head -1)
log "built $deb ($(stat -c %s "$deb") bytes) and $rpm ($(stat -c %s "$rpm") bytes)"
