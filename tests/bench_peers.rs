//! Benchmark: clawnode's peer reconcile against `wg syncconf` doing the same work on the same
//! backend (userspace wireguard-go, UAPI), in the same run, and the daemon's idle RSS with 0
//! and 10,000 peers. Prints figures and ratios; asserts only correctness (no timing limits).
//! Run as root: `cargo test --release --features test-fakes --test bench_peers -- --ignored --nocapture`
//!
//! With `CLAWNODE_BENCH_BACKEND=kernel` the same reconcile runs against kernel WireGuard
//! devices in the caller's own namespace (the VM test runs it that way, where the module
//! exists); the daemon RSS part is skipped there, and the devices are left in place for the
//! throwaway VM to discard.

// Test code: a failed unwrap is a failed test, and benchmarks print their figures.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]
#![cfg(feature = "test-fakes")]

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clawnode::core::peer_diff::{self, PeerKey, PeerMap, PeerSpec};
use clawnode::mesh::wireguard::device::{DeviceChange, WgControl, WgDevice};
use clawnode::mesh::wireguard::keys::{self, PrivateKey};
use support::Node;
use support::lab::{self, Lab};
use wireguard_control::{Backend, Key};

const PEERS: usize = 10_000;

/// A WireGuard device for the bench: a wireguard-go daemon, or a kernel link.
struct Daemon(Option<Child>, String);

fn kernel_mode() -> bool {
    std::env::var("CLAWNODE_BENCH_BACKEND").as_deref() == Ok("kernel")
}

impl Daemon {
    fn start(ns: &str, iface: &str) -> Daemon {
        if kernel_mode() {
            let out = Command::new("ip")
                .args(["link", "add", iface, "type", "wireguard"])
                .output()
                .unwrap();
            support::succeeded(&out);
            return Daemon(None, iface.to_string());
        }
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", iface])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let sock = format!("/var/run/wireguard/{iface}.sock");
        let start = Instant::now();
        while !std::path::Path::new(&sock).exists() {
            assert!(start.elapsed() < Duration::from_secs(5), "no {sock}");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The socket appears a moment before the daemon answers on it.
        while !Command::new("wg")
            .args(["show", iface])
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{iface} never answered"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Daemon(Some(child), iface.to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Kernel devices are left for the VM's power-off: removing a device removes each of
        // its 10,000 peers behind an RCU grace period, which takes many minutes under TCG.
        let Some(child) = self.0.as_mut() else {
            return;
        };
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.1));
    }
}

fn peer(i: usize) -> (PeerSpec, String) {
    let public = Key::generate_private().get_public();
    let ip = format!("2001:db8::{:x}:{:x}/128", i / 0x10000, i % 0x10000);
    let spec = PeerSpec::new(PeerKey(public.0), vec![ip.parse().unwrap()]);
    (spec, public.to_base64())
}

fn wg_conf(private: &str, port: u16, peers: &PeerMap) -> String {
    let mut out = format!("[Interface]\nPrivateKey = {private}\nListenPort = {port}\n");
    for p in peers.values() {
        let _ = write!(
            out,
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
            keys::to_base64(&p.key),
            p.allowed_ips[0]
        );
        if let Some(k) = p.keepalive {
            let _ = writeln!(out, "PersistentKeepalive = {k}");
        }
    }
    out
}

fn syncconf(iface: &str, conf: &str) -> Duration {
    let path = std::env::temp_dir().join(format!("{iface}.conf"));
    std::fs::write(&path, conf).unwrap();
    let start = Instant::now();
    let out = Command::new("wg")
        .args(["syncconf", iface])
        .arg(&path)
        .output()
        .unwrap();
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "wg syncconf {iface}: {:?} {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(path);
    took
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
#[ignore = "benchmark; run by tests/run-all.sh with --release"]
fn reconcile_10k_peers_against_wg_syncconf() {
    let kernel = kernel_mode();
    if !kernel && let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    // Kernel devices live in the caller's namespace, where netlink and `wg` look for them.
    let lab = (!kernel).then(|| Lab::new(1));
    let tag = lab.as_ref().map_or_else(
        || format!("{:x}", std::process::id() % 0xfff),
        |l| l.tag.clone(),
    );
    let ns = lab.as_ref().map_or("", |l| l.ns(0)).to_string();
    let device = WgControl {
        backend: if kernel {
            Backend::Kernel
        } else {
            Backend::Userspace
        },
    };
    println!(
        "backend: {}",
        if kernel {
            "kernel (netlink)"
        } else {
            "userspace (wireguard-go, UAPI)"
        }
    );
    let mut desired = PeerMap::new();
    for i in 0..PEERS {
        let (spec, _) = peer(i);
        desired.insert(spec.key, spec);
    }
    let private = PrivateKey::generate();
    let private_b64 = Key(*private.bytes()).to_base64();

    // 1. Fresh interface, 10,000 peers: read + diff + apply, against wg syncconf. Three rounds
    //    on new daemons, alternating which goes first; medians.
    let mut ours_runs = Vec::new();
    let mut theirs_runs = Vec::new();
    let mut daemons = Vec::new();
    for round in 0..3 {
        let (a, b) = (format!("cwb{tag}a{round}"), format!("cwb{tag}b{round}"));
        // Each daemon of the round needs its own port: they share the namespace.
        let (port_a, port_b) = (51910 + 2 * round as u16, 51911 + 2 * round as u16);
        let conf = wg_conf(&private_b64, port_b, &desired);
        let da = Daemon::start(&ns, &a);
        let db = Daemon::start(&ns, &b);
        let ours = || {
            let start = Instant::now();
            let state = device.read(&a).unwrap();
            let diff = peer_diff::diff(&state.peers, &desired, &PeerMap::new());
            device
                .apply(
                    &a,
                    &DeviceChange {
                        private_key: Some(&private),
                        listen_port: Some(port_a),
                        fwmark: None,
                        peers: &diff,
                    },
                )
                .unwrap();
            start.elapsed()
        };
        if round % 2 == 0 {
            ours_runs.push(ours());
            theirs_runs.push(syncconf(&b, &conf));
        } else {
            theirs_runs.push(syncconf(&b, &conf));
            ours_runs.push(ours());
        }
        assert_eq!(device.read(&a).unwrap().peers.len(), PEERS);
        assert_eq!(device.read(&b).unwrap().peers.len(), PEERS);
        daemons.push((da, db, a, b));
    }
    ours_runs.sort();
    theirs_runs.sort();
    let (ours_full, theirs_full) = (ours_runs[1], theirs_runs[1]);
    println!(
        "reconcile {PEERS} peers onto a fresh interface (median of 3): clawnode {:.1} ms, wg syncconf {:.1} ms, ratio clawnode/wg = {:.2} (target <= 1.0); runs clawnode {:?} wg {:?}",
        ms(ours_full),
        ms(theirs_full),
        ours_full.as_secs_f64() / theirs_full.as_secs_f64(),
        ours_runs.iter().map(|d| ms(*d).round()).collect::<Vec<_>>(),
        theirs_runs
            .iter()
            .map(|d| ms(*d).round())
            .collect::<Vec<_>>()
    );
    let (_, _, a, b) = daemons
        .last()
        .map(|(_, _, a, b)| ((), (), a.clone(), b.clone()))
        .unwrap();
    // The last round's port for b (round 2).
    let port_b = 51915;

    // 2. One peer changes among 10,000: clawnode diffs against what it applied and sends one
    //    peer; wg syncconf reads the device back and diffs. Median of 5 changes each.
    let before = device.read(&a).unwrap().peers;
    let keys_sorted: Vec<PeerKey> = desired.keys().copied().collect();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut applied = desired.clone();
    for round in 0..5 {
        let mut next = applied.clone();
        let k = keys_sorted[PEERS / 2 + round];
        next.get_mut(&k).unwrap().keepalive = Some(25);
        let start = Instant::now();
        let diff = peer_diff::diff(&applied, &next, &applied);
        device
            .apply(
                &a,
                &DeviceChange {
                    private_key: None,
                    listen_port: None,
                    fwmark: None,
                    peers: &diff,
                },
            )
            .unwrap();
        ours.push(start.elapsed());
        assert_eq!(diff.len(), 1);
        theirs.push(syncconf(&b, &wg_conf(&private_b64, port_b, &next)));
        applied = next;
    }
    ours.sort();
    theirs.sort();
    let (o, t) = (ours[2], theirs[2]);
    println!(
        "change 1 peer among {PEERS}: clawnode {:.2} ms, wg syncconf {:.1} ms, speed-up {:.0}x (targets >= 10x and <= 10 ms)",
        ms(o),
        ms(t),
        t.as_secs_f64() / o.as_secs_f64()
    );
    let after = device.read(&a).unwrap().peers;
    let touched: Vec<&PeerKey> = after
        .iter()
        .filter(|(k, p)| before.get(k) != Some(p))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(touched.len(), 5, "only the 5 changed peers differ");
    println!(
        "peers other than the changed ones left untouched: {}",
        PEERS - touched.len()
    );

    drop(daemons);
    let Some(lab) = lab else {
        return;
    };
    // 3. The daemon's idle RSS with 0 and with 10,000 peers (userspace backend).
    for count in [0usize, PEERS] {
        let iface = format!("cwb{}{}", lab.tag, if count == 0 { "z" } else { "k" });
        let node = Node::start_in(
            Some(lab.ns(0)),
            |d| {
                let peers_dir = d.join("peers.d");
                std::fs::create_dir_all(&peers_dir).unwrap();
                let mut file = String::new();
                let mut seen = BTreeMap::new();
                for i in 0..count {
                    let (spec, b64) = peer(i);
                    seen.insert(spec.key, ());
                    let _ = write!(
                        file,
                        "[[peers]]\nname = \"p{i}\"\npublic_key = \"{b64}\"\nallowed_ips = [\"{}\"]\n",
                        spec.allowed_ips[0]
                    );
                }
                std::fs::write(peers_dir.join("bench.toml"), file).unwrap();
                format!(
                    "[node]\nname = \"bench\"\nstate_dir = \"{d}/state\"\nruntime_dir = \"{d}/run\"\n\
                     [api]\nsocket = \"{d}/run/clawnode.sock\"\n\
                     [network]\nprovider = \"wireguard\"\n\
                     [network.wireguard]\ninterface = \"{iface}\"\nbackend = \"userspace\"\nlisten_port = 51902\n\
                     mesh_cidr = \"198.51.100.0/24\"\naddress = \"198.51.100.1/24\"\npeers_dir = \"{d}/peers.d\"\n\
                     [gpu]\nenabled = false\n",
                    d = d.display()
                )
            },
            &[],
        );
        let start = Instant::now();
        node.recv_until("READY=1", Duration::from_secs(120));
        let ready = start.elapsed();
        std::thread::sleep(Duration::from_secs(12));
        let pid = node.pid().as_raw();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap_or("")
            .to_string();
        println!(
            "daemon with {count} peers: READY after {:.0} ms; idle {rss} (targets: <= 8 MB at 0, <= 20 MB at {PEERS})",
            ms(ready)
        );
    }
}
