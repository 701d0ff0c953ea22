//! Acceptance: a hostile mesh peer floods node-info and `metrics_listen` from its own network
//! namespace, holding thousands of idle or slowly typed connections from 127 addresses it
//! routes through the tunnel, and opening new ones for a minute. Throughout, `clawnode status`
//! answers, another peer's node-info requests succeed, slow connections are cut at the header
//! timeout and the daemon's descriptors stay under their cap; its RSS is reported beside the
//! target. Needs root and wireguard-go.
//! Run: `cargo test --release --features test-fakes --test flood -- --ignored --nocapture`
//! (`CLAWNODE_FLOOD_SECS` shortens the minute.)

// Test code: a failed unwrap is a failed test, and this test prints its figures.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]
#![cfg(feature = "test-fakes")]

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::Node;
use support::lab::{self, Lab};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connections the flooding peer keeps trying to hold, per endpoint.
const HELD: usize = 3_000;
const NODE_INFO_PORT: u16 = 51821;
const METRICS_PORT: u16 = 9464;
/// From `Limits::PEERS` (node-info and metrics_listen, each) and `Limits::LOCAL` (the API).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const DEADLINE: Duration = Duration::from_secs(10);
/// The endpoints' caps (256 + 256 + 64) plus what the daemon holds at rest, rounded up; the
/// unit's LimitNOFILE is 4096.
const FD_CAP: usize = 640;
const RSS_TARGET_KB: i64 = 2 * 1024;

fn mesh_ip(i: usize) -> String {
    format!("198.51.100.{}", i + 1)
}

/// The flooder's extra addresses, routed to it through the tunnel.
fn flood_sources() -> Vec<Ipv4Addr> {
    (128..=254)
        .map(|i| Ipv4Addr::new(198, 51, 100, i))
        .collect()
}

struct Peer {
    child: Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn genkey(dir: &std::path::Path, name: &str) -> (String, String) {
    let (path, public) = lab::wg_key(dir, name);
    (path.display().to_string(), public)
}

/// A plain wireguard-go peer (not clawnode) in node `i`'s namespace, talking to node 0.
fn start_peer(lab: &Lab, i: usize, key_file: &str, node0_pub: &str, extra: &[Ipv4Addr]) -> Peer {
    let iface = lab.iface(i);
    let child = Command::new("ip")
        .args(["netns", "exec", lab.ns(i), "wireguard-go", "-f", &iface])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sock = format!("/var/run/wireguard/{iface}.sock");
    let start = Instant::now();
    while !std::path::Path::new(&sock).exists() {
        assert!(start.elapsed() < Duration::from_secs(5), "no {sock}");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let ns = lab.ns(i);
    lab::sh(&format!(
        "ip netns exec {ns} wg set {iface} private-key {key_file} listen-port 51820 \
         peer {node0_pub} endpoint {}:51820 allowed-ips 198.51.100.0/24 persistent-keepalive 1 && \
         ip -n {ns} addr add {}/24 dev {iface} && ip -n {ns} link set {iface} up",
        lab.underlay(0),
        mesh_ip(i)
    ));
    if !extra.is_empty() {
        let batch: String = extra
            .iter()
            .map(|a| format!("addr add {a}/32 dev {iface}\n"))
            .collect();
        let path = std::env::temp_dir().join(format!("flood-addrs-{}", lab.tag));
        std::fs::write(&path, batch).unwrap();
        lab::sh(&format!("ip -n {ns} -batch {}", path.display()));
        let _ = std::fs::remove_file(path);
    }
    Peer { child }
}

fn node_config(lab: &Lab, dir: &std::path::Path, key: &str, peers: &[(String, String)]) -> String {
    let d = dir.display();
    let mut text = format!(
        r#"
[node]
name = "target"
state_dir = "{d}/state"
runtime_dir = "{d}/run"

[api]
socket = "{d}/run/clawnode.sock"
metrics_listen = "{ip}:{METRICS_PORT}"

[network]
provider = "wireguard"

[network.wireguard]
interface = "{iface}"
backend = "userspace"
listen_port = 51820
mesh_cidr = "198.51.100.0/24"
address = "{ip}/24"
private_key_file = "{key}"
node_info_port = {NODE_INFO_PORT}
peers_dir = "{d}/peers.d"

[gpu]
enabled = false

[services.molt-provider]
port = 8443
mode = "tcp"
# Nothing listens behind it: node-info lists only healthy services.
[services.molt-provider.check]
type = "none"
"#,
        iface = lab.iface(0),
        ip = mesh_ip(0),
    );
    for (i, (public, allowed)) in peers.iter().enumerate() {
        text.push_str(&format!(
            "\n[[network.wireguard.peers]]\nname = \"peer-{n}\"\npublic_key = \"{public}\"\nendpoint = \"{ep}:51820\"\nallowed_ips = [{allowed}]\n",
            n = i + 1,
            ep = lab.underlay(i + 1),
        ));
    }
    text
}

/// Counters one flood endpoint's connections report into.
#[derive(Default)]
struct Tally {
    opened: AtomicU64,
    connect_failed: AtomicU64,
    /// Hung up within 200 ms: refused at accept or displaced.
    closed_at_once: AtomicU64,
    /// Hung up later: by the header timeout or the deadline.
    closed_later: AtomicU64,
    longest_ms: AtomicU64,
    answered: AtomicU64,
}

/// One flooding connection slot: connect from `source`, hold the connection idle or type a
/// request one byte every 700 ms, wait for the hang-up, then do it again.
async fn flood_loop(
    source: Ipv4Addr,
    target: SocketAddr,
    slow: bool,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // Ports freed a moment ago may be taken again: this source opens thousands a minute.
        socket.set_reuseaddr(true).unwrap();
        if socket.bind(SocketAddr::new(source.into(), 0)).is_err() {
            tally.connect_failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let stream =
            match tokio::time::timeout(Duration::from_secs(3), socket.connect(target)).await {
                Ok(Ok(s)) => s,
                _ => {
                    tally.connect_failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
        tally.opened.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let (mut rd, mut wr) = stream.into_split();
        let typing = async {
            if !slow {
                return std::future::pending::<()>().await;
            }
            for byte in b"GET /v1/node HTTP/1.1\r\nHost: x\r\n" {
                tokio::time::sleep(Duration::from_millis(700)).await;
                if wr.write_all(&[*byte]).await.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await
        };
        let mut buf = [0u8; 256];
        let hung_up = async {
            matches!(rd.read(&mut buf).await, Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 2"))
        };
        let answered = tokio::select! {
            a = hung_up => a,
            () = typing => false,
        };
        let lived = started.elapsed();
        if answered {
            tally.answered.fetch_add(1, Ordering::Relaxed);
        }
        if lived < Duration::from_millis(200) {
            tally.closed_at_once.fetch_add(1, Ordering::Relaxed);
        } else {
            tally.closed_later.fetch_add(1, Ordering::Relaxed);
        }
        tally
            .longest_ms
            .fetch_max(lived.as_millis() as u64, Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // Reconnect soon, not at once: a minute-long flood, not a CPU burner on 2 cores.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn flood(
    lab: &Lab,
    secs: u64,
    node_info: Arc<Tally>,
    metrics: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let file = lab.netns_file(lab.ns(1));
    lab::in_netns(file, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sources = flood_sources();
            let ip: Ipv4Addr = mesh_ip(0).parse().unwrap();
            let mut tasks = Vec::new();
            for n in 0..2 * HELD {
                let (port, tally) = if n % 2 == 0 {
                    (NODE_INFO_PORT, Arc::clone(&node_info))
                } else {
                    (METRICS_PORT, Arc::clone(&metrics))
                };
                let source = sources[n / 2 % sources.len()];
                tasks.push(tokio::spawn(flood_loop(
                    source,
                    SocketAddr::new(ip.into(), port),
                    n / 2 % 2 == 1,
                    tally,
                    Arc::clone(&stop),
                )));
                // Ramp up over a few seconds rather than in one burst of SYNs.
                if n % 200 == 199 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            tokio::time::sleep(Duration::from_secs(secs)).await;
            // No new connections from here; the open ones wait for the server to hang up.
            stop.store(true, Ordering::Relaxed);
            // Those the server never accepted (the kernel's accept queue overflowed, so the
            // handshake never completed on its side) would wait forever: give up on them.
            tokio::time::sleep(2 * DEADLINE).await;
            tasks.iter().filter(|t| !t.is_finished()).count()
        })
    })
}

/// A well-behaved peer's node-info request, from its own namespace.
fn node_info_get(lab: &Lab, from: usize) -> Result<Duration, String> {
    let file = lab.netns_file(lab.ns(from));
    let target: SocketAddr = format!("{}:{NODE_INFO_PORT}", mesh_ip(0)).parse().unwrap();
    lab::in_netns(file, move || {
        let started = Instant::now();
        let mut stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET /v1/node HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .map_err(|e| format!("read: {e}"))?;
        if reply.starts_with("HTTP/1.1 200") && reply.contains("molt-provider") {
            Ok(started.elapsed())
        } else {
            Err(format!("reply: {:?}", reply.lines().next()))
        }
    })
    .join()
    .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= (2 * HELD + 1024) as u64,
        "the flood needs {} descriptors; the hard limit is {}",
        2 * HELD + 1024,
        limit.rlim_max
    );
}

#[test]
#[ignore = "a minute-long flood; run by tests/run-all.sh as root"]
fn a_flooding_peer_cannot_starve_status_or_other_peers() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let secs: u64 = std::env::var("CLAWNODE_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    raise_nofile();
    let lab = Lab::new(3);
    let keydir = tempfile::tempdir().unwrap();
    let (key0, pub0) = genkey(keydir.path(), "node0");
    let (key1, pub1) = genkey(keydir.path(), "node1");
    let (key2, pub2) = genkey(keydir.path(), "node2");
    let peers = vec![
        (
            pub1,
            format!("\"{}/32\", \"198.51.100.128/25\"", mesh_ip(1)),
        ),
        (pub2, format!("\"{}/32\"", mesh_ip(2))),
    ];
    let node = Node::start_in(
        Some(lab.ns(0)),
        |d| {
            std::fs::create_dir_all(d.join("peers.d")).unwrap();
            node_config(&lab, d, &key0, &peers)
        },
        &[],
    );
    node.recv_until("READY=1", Duration::from_secs(20));
    let _flooder = start_peer(&lab, 1, &key1, &pub0, &flood_sources());
    let _other = start_peer(&lab, 2, &key2, &pub0, &[]);
    for i in [1, 2] {
        let start = Instant::now();
        while !lab.ping(i, &mesh_ip(0), 1) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "peer {i} never reached node 0"
            );
        }
    }
    let pid = node.pid().as_raw();
    let socket = node.path("run/clawnode.sock");
    let socket = socket.to_str().unwrap().to_string();
    let status_call = || {
        let started = Instant::now();
        let out = node.cli(&["status", "--socket", &socket]);
        assert!(
            out.status.success(),
            "clawnode status failed during the flood: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    };
    // Warm every path once, so the baseline already holds what serving costs at rest.
    for _ in 0..3 {
        node_info_get(&lab, 2).unwrap();
        status_call();
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_before = support::rss_kb(pid);
    let fds_before = support::open_fds(pid);

    let node_info = Arc::new(Tally::default());
    let metrics = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let flood_started = Instant::now();
    let flooder = flood(
        &lab,
        secs,
        Arc::clone(&node_info),
        Arc::clone(&metrics),
        Arc::clone(&stop),
    );

    let mut status_times = Vec::new();
    let mut other_peer = Vec::new();
    let mut other_peer_failures = Vec::new();
    let (mut rss_max, mut fds_max) = (rss_before, fds_before);
    let mut tick = 0u64;
    while !stop.load(Ordering::Relaxed) {
        status_times.push(status_call());
        if tick.is_multiple_of(2) {
            match node_info_get(&lab, 2) {
                Ok(took) => other_peer.push(took),
                Err(e) => other_peer_failures.push(e),
            }
        }
        rss_max = rss_max.max(support::rss_kb(pid));
        fds_max = fds_max.max(support::open_fds(pid));
        tick += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let flood_took = flood_started.elapsed();
    // The server hangs up on what it still holds: watch its descriptors come back down.
    let stopped = Instant::now();
    while support::open_fds(pid) > fds_before + 2 && stopped.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let last_hung_up = stopped.elapsed();
    let never_accepted = flooder.join().unwrap();
    // The flooder's last sockets closed with its runtime; those the server accepted only then
    // wait out the header timeout.
    std::thread::sleep(HEADER_TIMEOUT + Duration::from_secs(2));
    let rss_after = support::rss_kb(pid);
    let fds_after = support::open_fds(pid);

    status_times.sort();
    other_peer.sort();
    println!(
        "flood: {:.0} s from 127 addresses of one peer, {HELD} connections held per endpoint",
        flood_took.as_secs_f64()
    );
    for (name, t) in [("node-info", &node_info), ("metrics_listen", &metrics)] {
        println!(
            "  {name:>14}: opened {}, closed at once (refused/displaced) {}, closed later {}, answered {}, connect failed {}, longest {} ms (header timeout {} ms, deadline {} ms)",
            t.opened.load(Ordering::Relaxed),
            t.closed_at_once.load(Ordering::Relaxed),
            t.closed_later.load(Ordering::Relaxed),
            t.answered.load(Ordering::Relaxed),
            t.connect_failed.load(Ordering::Relaxed),
            t.longest_ms.load(Ordering::Relaxed),
            HEADER_TIMEOUT.as_millis(),
            DEADLINE.as_millis(),
        );
    }
    println!(
        "  after the flood stopped, the daemon had closed every held connection in {:.1} s (header timeout {} s); {never_accepted} client connections were never accepted (kernel accept queue full)",
        last_hung_up.as_secs_f64(),
        HEADER_TIMEOUT.as_secs()
    );
    println!(
        "  clawnode status: {} calls, p50 {:.1} ms, p99 {:.1} ms, all answered",
        status_times.len(),
        percentile(&status_times, 0.5).as_secs_f64() * 1e3,
        percentile(&status_times, 0.99).as_secs_f64() * 1e3,
    );
    println!(
        "  other peer's node-info: {} ok, {} failed{}",
        other_peer.len(),
        other_peer_failures.len(),
        if other_peer.is_empty() {
            String::new()
        } else {
            format!(
                ", p50 {:.1} ms, p99 {:.1} ms",
                percentile(&other_peer, 0.5).as_secs_f64() * 1e3,
                percentile(&other_peer, 0.99).as_secs_f64() * 1e3
            )
        }
    );
    println!("  descriptors: {fds_before} before, max {fds_max} (cap {FD_CAP}), {fds_after} after");
    println!(
        "  RSS: {rss_before} kB before, max {rss_max} kB (+{} kB), {rss_after} kB after the flood (+{} kB; target < +{RSS_TARGET_KB} kB)",
        rss_max - rss_before,
        rss_after - rss_before,
    );

    assert!(
        other_peer_failures.is_empty(),
        "another peer's node-info failed: {other_peer_failures:?}"
    );
    assert!(fds_max <= FD_CAP, "{fds_max} descriptors (cap {FD_CAP})");
    for t in [&node_info, &metrics] {
        assert!(t.opened.load(Ordering::Relaxed) >= HELD as u64);
        assert_eq!(
            t.answered.load(Ordering::Relaxed),
            0,
            "a slow head was answered"
        );
    }
    // Held connections are cut by the server, not left open: within the header timeout plus
    // the accept backlog's wait, far below the 60 s the flooder would wait.
    assert!(
        last_hung_up < 2 * DEADLINE,
        "held connections lingered {last_hung_up:?} after the flood"
    );
    assert!(
        fds_after <= fds_before + 2,
        "descriptors leaked: {fds_before} → {fds_after}"
    );
}
