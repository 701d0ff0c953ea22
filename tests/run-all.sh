#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh Debian machine (run it as root there; it
# installs what it needs). Safe to re-run: installs are skipped when already present.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_needs=()
command -v gcc >/dev/null || apt_needs+=(gcc libc6-dev)
command -v curl >/dev/null || apt_needs+=(curl ca-certificates)
# The mesh tests: network namespaces, veth, userspace WireGuard, ping, pgrep.
command -v ip >/dev/null || apt_needs+=(iproute2)
command -v wg >/dev/null || apt_needs+=(wireguard-tools)
command -v wireguard-go >/dev/null || apt_needs+=(wireguard-go)
command -v ping >/dev/null || apt_needs+=(iputils-ping)
command -v pgrep >/dev/null || apt_needs+=(procps)
# systemd-analyze checks the unit's exposure score offline.
command -v systemd-analyze >/dev/null || apt_needs+=(systemd)
# promtool checks the /metrics exposition (Debian ships it in the prometheus package).
command -v promtool >/dev/null || apt_needs+=(prometheus)
# The etcd store (the default `store-etcd` feature) builds its gRPC client with protoc; its
# tests run a real three-member cluster of Debian's etcd and must not skip here.
command -v protoc >/dev/null || apt_needs+=(protobuf-compiler)
command -v etcd >/dev/null || apt_needs+=(etcd-server)
command -v etcdctl >/dev/null || apt_needs+=(etcd-client)
export CLAWNODE_REQUIRE_ETCD=1
if ((${#apt_needs[@]})); then
  log "apt-get install ${apt_needs[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${apt_needs[@]}"
fi

[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! command -v cargo >/dev/null; then
  # Debian's own cargo is older than edition 2024 needs (1.85).
  log "installing Rust with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  . "$HOME/.cargo/env"
fi
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (release feature set, then with the test fakes)"
cargo clippy --all-targets --locked -- -D warnings
cargo clippy --all-targets --locked --features test-fakes -- -D warnings

log "cargo test (unit, property and integration tests against the real binary)"
cargo test --locked --features test-fakes

# Fuzzing (tests/fuzz, cargo-fuzz): `cargo test` above replayed every saved input on stable;
# here each target also runs for FUZZ_SECONDS (default 15) on nightly, where one is installed.
# New inputs go to target/fuzz-corpus, not the committed corpus; a crash fails the run and
# leaves its input in tests/fuzz/artifacts/<target>/.
if cargo +nightly --version >/dev/null 2>&1; then
  cargo fuzz --version >/dev/null 2>&1 || { log "installing cargo-fuzz"; cargo install --locked cargo-fuzz; }
  fuzz_seconds=${FUZZ_SECONDS:-15}
  log "fuzzing: each target for ${fuzz_seconds} s (cargo-fuzz on nightly)"
  cargo +nightly fuzz build --fuzz-dir tests/fuzz -s none -a
  for target in $(cargo +nightly fuzz list --fuzz-dir tests/fuzz); do
    mkdir -p "target/fuzz-corpus/$target"
    if ! cargo +nightly fuzz run --fuzz-dir tests/fuzz -s none -a "$target" \
      "target/fuzz-corpus/$target" "tests/fuzz/corpus/$target" \
      -- -max_total_time="$fuzz_seconds" -timeout=10 -print_final_stats=1 >"target/fuzz-$target.log" 2>&1; then
      tail -n 40 "target/fuzz-$target.log"
      echo "fuzz target $target failed; its input is in tests/fuzz/artifacts/$target/"
      exit 1
    fi
    echo "$target: $(grep -E '^stat::number_of_executed_units' "target/fuzz-$target.log" | awk '{print $2}') executions, no crash"
  done
else
  log "fuzzing skipped: no nightly toolchain (rustup toolchain install nightly); cargo test replayed the corpora"
fi

log "footprint: exec to READY=1, idle RSS, idle CPU over 60 s (release build)"
cargo test --locked --release --features test-fakes --test footprint -- --ignored --nocapture

log "benchmark: 10,000 peers against wg syncconf, idle RSS with 0 and 10,000 peers (release, root)"
cargo test --locked --release --features test-fakes --test bench_peers -- --ignored --nocapture

log "benchmark: /metrics with 8 stand-in GPUs, idle RSS with 8 and 0 GPUs (release)"
cargo test --locked --release --features test-fakes --test bench_gpu -- --ignored --nocapture

if [[ $(id -u) -eq 0 ]]; then
  log "benchmark: one gateway, 1,000 then 10,000 long-polling simulated nodes over loopback TLS; then three gateways on a 3-member etcd, 1,000 nodes, one gateway killed, 10,000 racing joins (release, root)"
  cargo test --locked --release --features test-fakes --test bench_gateway -- --ignored --nocapture --test-threads=1

  log "flood: 3,000 held connections to node-info and metrics_listen from a peer, one minute (release, root)"
  cargo test --locked --release --features test-fakes --test flood -- --ignored --nocapture

  log "packages and the VM test"
  tests/packages.sh
  # The VM has no GPU; on a host with the NVIDIA driver the same .deb is also booted under a
  # real systemd with the host's GPU (the unit's device allowances, NVML in the sandbox).
  if grep -qE '^[0-9]+ nvidia(ctl|-frontend)?$' /proc/devices; then
    log "the packaged unit on this host's NVIDIA GPU (tests/gpu-host)"
    # Keyed on the script that builds it, like the VM image.
    rootfs=target/gpu-host-rootfs-$(sha256sum tests/gpu-host/rootfs.sh | cut -c1-16).tar.xz
    [[ -s $rootfs ]] || tests/gpu-host/rootfs.sh "$rootfs"
    tests/gpu-host/run.sh "$rootfs" "$(ls target/vm-debs/clawnode_*.deb)" target/gpu-host
  else
    log "tests/gpu-host skipped: no NVIDIA driver on this host"
  fi
else
  log "packages and the VM test skipped: they need root"
fi

log "all tests passed"
