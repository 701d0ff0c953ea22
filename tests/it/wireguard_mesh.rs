//! The self-hosted mesh for real: four nodes in their own network namespaces, each running the
//! real `clawnode run` with the userspace backend (Debian's wireguard-go), real packets through
//! the tunnels. Needs root; skipped (with a note) otherwise.
//!
//! Addresses: underlay 192.0.2.0/24 (TEST-NET-1) on a bridge; mesh 198.51.100.0/24
//! (TEST-NET-2), node i at 198.51.100.(i+1). Node 1 and 2 advertise molt-provider, node 3
//! only gateway, node 0 nothing.

use crate::support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::lab::{self, Lab};
use crate::support::{Node, has};
use nix::sys::signal::Signal;

pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) fn mesh_ip(i: usize) -> String {
    format!("198.51.100.{}", i + 1)
}

pub(crate) struct Keys {
    private_files: Vec<String>,
    pub(crate) public: Vec<String>,
    _dir: tempfile::TempDir,
}

pub(crate) fn keys(n: usize) -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let mut private_files = Vec::new();
    let mut public = Vec::new();
    for i in 0..n {
        let (path, key) = lab::wg_key(dir.path(), &format!("node{i}"));
        public.push(key);
        private_files.push(path.display().to_string());
    }
    Keys {
        private_files,
        public,
        _dir: dir,
    }
}

pub(crate) fn peer_block(lab: &Lab, keys: &Keys, j: usize, extra: &str) -> String {
    format!(
        "[[network.wireguard.peers]]\nname = \"node-{j}\"\npublic_key = \"{}\"\nendpoint = \"{}:51820\"\nallowed_ips = [\"{}/32\"]\n{extra}\n",
        keys.public[j],
        lab.underlay(j),
        mesh_ip(j)
    )
}

pub(crate) fn node_config(
    lab: &Lab,
    keys: &Keys,
    i: usize,
    peers: &str,
    services: &str,
    dir: &Path,
) -> String {
    std::fs::create_dir_all(dir.join("peers.d")).unwrap();
    let d = dir.display();
    format!(
        r#"
[node]
name = "node-{i}"
state_dir = "{d}/state"
runtime_dir = "{d}/run"

[api]
socket = "{d}/run/clawnode.sock"

[network]
provider = "wireguard"

[network.wireguard]
interface = "{iface}"
backend = "userspace"
listen_port = 51820
mesh_cidr = "198.51.100.0/24"
address = "{ip}/24"
private_key_file = "{key}"
node_info_port = 51821
peers_dir = "{d}/peers.d"
reconcile_interval = "1s"

{peers}

[gpu]
enabled = false

{services}
"#,
        iface = lab.iface(i),
        ip = mesh_ip(i),
        key = keys.private_files[i],
    )
}

pub(crate) fn all_peers(lab: &Lab, keys: &Keys, i: usize, n: usize) -> String {
    (0..n)
        .filter(|&j| j != i)
        .map(|j| peer_block(lab, keys, j, ""))
        .collect()
}

// Nothing listens behind these in the lab: checks off, so discovery finds them (health
// gating over WireGuard is tested in service_health.rs).
const MOLT: &str = "[services.molt-provider]\nport = 8443\nmode = \"tcp\"\n[services.molt-provider.check]\ntype = \"none\"\n";
const GATEWAY: &str =
    "[services.gateway]\nport = 443\nmode = \"tcp\"\n[services.gateway.check]\ntype = \"none\"\n";

fn services_of(i: usize) -> &'static str {
    match i {
        1 | 2 => MOLT,
        3 => GATEWAY,
        _ => "",
    }
}

fn start_mesh(lab: &Lab, keys: &Keys, n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let mut peers = all_peers(lab, keys, i, n);
            if i == 0 {
                // A network behind node 1, outside the mesh CIDR: it needs its own route.
                peers = peers.replace(
                    &format!("allowed_ips = [\"{}/32\"]", mesh_ip(1)),
                    &format!("allowed_ips = [\"{}/32\", \"203.0.113.0/24\"]", mesh_ip(1)),
                );
            }
            Node::start_in(
                Some(lab.ns(i)),
                |d| node_config(lab, keys, i, &peers, services_of(i), d),
                &[],
            )
        })
        .collect()
}

/// Time until node `from` reaches `ip` through the tunnel again, polling with 200 ms pings.
fn time_to_reach(lab: &Lab, from: usize, ip: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if lab
            .exec(from, &["ping", "-c1", "-W", "0.2", ip])
            .status
            .success()
        {
            return Some(start.elapsed());
        }
    }
    None
}

fn wireguard_go_pid(iface: &str) -> Option<i32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("wireguard-go -f {iface}$")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn four_nodes_mesh_ping_discover_repair_and_stop() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let n = 4;
    let lab = Lab::new(n);
    let keys = keys(n);
    let mut nodes = start_mesh(&lab, &keys, n);

    // READY=1 only once the interface is configured.
    for (i, node) in nodes.iter().enumerate() {
        let seen = node.recv_until("READY=1", WAIT);
        let addr = lab.exec(i, &["ip", "-br", "addr", "show", "dev", &lab.iface(i)]);
        let addr = String::from_utf8_lossy(&addr.stdout).to_string();
        assert!(
            addr.contains(&format!("{}/24", mesh_ip(i))),
            "node {i}: {addr}"
        );
        assert!(
            addr.contains("UP") || addr.contains("UNKNOWN"),
            "node {i}: {addr}"
        );
        let status = support::last_status(&seen);
        assert!(
            status.starts_with(&format!(
                "ready: wireguard/userspace {} {}/24",
                lab.iface(i),
                mesh_ip(i)
            )),
            "{status}"
        );
    }

    // Routes: the mesh CIDR, and node 1's network outside it.
    let routes = String::from_utf8_lossy(&lab.exec(0, &["ip", "route"]).stdout).to_string();
    assert!(
        routes.contains(&format!("198.51.100.0/24 dev {}", lab.iface(0))),
        "{routes}"
    );
    assert!(
        routes.contains(&format!("203.0.113.0/24 dev {}", lab.iface(0))),
        "{routes}"
    );

    // Applying the same configuration again changes nothing.
    let reconciled = |node: &Node| {
        node.stderr()
            .matches("WireGuard interface reconciled")
            .count()
    };
    let before = reconciled(&nodes[0]);
    nodes[0].signal(Signal::SIGHUP);
    nodes[0].recv_until("READY=1", WAIT);
    assert_eq!(reconciled(&nodes[0]), before, "{}", nodes[0].stderr());

    // Real packets through the tunnels.
    for j in 1..n {
        assert!(lab.ping(0, &mesh_ip(j), 5), "node 0 cannot ping node {j}");
    }

    // Discovery from node 0 finds nodes 1 and 2, not node 3 (gateway only).
    let out = lab.discover(0, &nodes[0].config, "molt-provider");
    support::succeeded(&out);
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = found["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["node-1", "node-2"], "{found}");
    assert_eq!(found["providers"][0]["port"], 8443);
    assert!(
        found["unreachable"].as_array().unwrap().is_empty(),
        "{found}"
    );

    // The node-info endpoint is not reachable on a non-mesh address: not on node 1's
    // underlay address, and not on its mesh address when the packet arrives outside the
    // tunnel (routed from the switch namespace over the underlay).
    let tcp_probe = |ns: &str, target: &str| {
        Command::new("ip")
            .args(["netns", "exec", ns, "timeout", "3", "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/{target}/51821"))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        tcp_probe(lab.ns(0), &mesh_ip(1)),
        "reachable through the tunnel"
    );
    assert!(
        !tcp_probe(lab.ns(0), &lab.underlay(1)),
        "not on the underlay address"
    );
    lab::sh(&format!(
        "ip -n {sw} addr add 192.0.2.254/24 dev br0 && ip -n {sw} route add {m}/32 via {u}",
        sw = lab.switch,
        m = mesh_ip(1),
        u = lab.underlay(1)
    ));
    assert!(
        !tcp_probe(&lab.switch, &mesh_ip(1)),
        "not on the mesh address from outside the tunnel"
    );

    // Deleting node 0's interface: repaired, and node 1 reachable again.
    lab::sh(&format!("ip -n {} link del {}", lab.ns(0), lab.iface(0)));
    let deleted = time_to_reach(&lab, 0, &mesh_ip(1), Duration::from_secs(10))
        .expect("connectivity restored after the interface was deleted");
    println!(
        "restore after interface deletion: {:.0} ms",
        deleted.as_secs_f64() * 1000.0
    );

    // Killing node 0's wireguard-go: restarted, connectivity restored.
    let pid = wireguard_go_pid(&lab.iface(0)).expect("wireguard-go runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let killed = time_to_reach(&lab, 0, &mesh_ip(1), Duration::from_secs(10))
        .expect("connectivity restored after wireguard-go was killed");
    println!(
        "restore after killing wireguard-go: {:.0} ms",
        killed.as_secs_f64() * 1000.0
    );
    assert_ne!(wireguard_go_pid(&lab.iface(0)), Some(pid));

    // A peer removed behind clawnode's back (`wg set … remove`, which sends no event) comes
    // back with the periodic reconcile (1 s here, 30 s by default).
    lab::sh(&format!(
        "ip netns exec {} wg set {} peer {} remove",
        lab.ns(0),
        lab.iface(0),
        keys.public[1]
    ));
    let removed = time_to_reach(&lab, 0, &mesh_ip(1), Duration::from_secs(10))
        .expect("peer restored by the periodic reconcile");
    println!(
        "restore after `wg set peer remove` (reconcile_interval 1s): {:.0} ms",
        removed.as_secs_f64() * 1000.0
    );

    // The status API shows the real provider's view.
    let doc = nodes[0].status_json();
    assert_eq!(doc["ready"], true, "{doc}");
    assert_eq!(doc["mesh"]["interface"], lab.iface(0));
    assert_eq!(doc["mesh"]["peers"], 3);
    let wg = &doc["mesh"]["wireguard"];
    assert_eq!(wg["backend"], "userspace", "{doc}");
    assert_eq!(wg["interface"], lab.iface(0));
    assert_eq!(wg["public_key"], keys.public[0]);
    assert_eq!(wg["listen_port"], 51820);
    assert_eq!(wg["addresses"][0], format!("{}/24", mesh_ip(0)));
    let peer1 = wg["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "node-1")
        .expect("node-1 listed");
    assert_eq!(peer1["public_key"], keys.public[1]);
    assert_eq!(peer1["endpoint"], format!("{}:51820", lab.underlay(1)));
    assert_eq!(peer1["allowed_ips"][0], format!("{}/32", mesh_ip(1)));
    assert!(
        peer1["last_handshake_unix_ms"].as_u64().is_some(),
        "{peer1}"
    );
    assert!(peer1["rx_bytes"].as_u64().unwrap() > 0);
    assert!(!doc.to_string().contains("PrivateKey") && !doc.to_string().contains("private"));
    let socket = nodes[0].path("run/clawnode.sock");
    let peers = nodes[0].cli(&["peers", "--socket", socket.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&peers.stdout);
    assert!(
        text.contains("node-1") && text.contains("handshake"),
        "{text}"
    );

    // Stop: withdraw, remove the interface, stop wireguard-go.
    let node0 = &mut nodes[0];
    node0.signal(Signal::SIGTERM);
    let seen = node0.recv_until("STOPPING=1", WAIT);
    assert!(has(&seen, "STOPPING=1"));
    let (status, _) = node0.wait_exit(Duration::from_secs(6));
    assert_eq!(status.code(), Some(0));
    let link = lab.exec(0, &["ip", "link", "show", &lab.iface(0)]);
    assert!(!link.status.success(), "interface removed on stop");
    assert_eq!(
        wireguard_go_pid(&lab.iface(0)),
        None,
        "wireguard-go stopped"
    );
}

/// A TCP stream between two nodes keeps flowing while a third node's peer entry is added,
/// changed and removed with SIGHUP reloads: no reset and no gap over a second.
#[test]
fn changing_another_peer_keeps_a_tcp_stream_flowing() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let n = 3;
    let lab = Lab::new(n);
    let keys = keys(n);
    // Node 0 starts knowing only node 1; node 2 knows both, node 1 knows both.
    let mut nodes = Vec::new();
    for i in 0..n {
        let peers = if i == 0 {
            peer_block(&lab, &keys, 1, "")
        } else {
            all_peers(&lab, &keys, i, n)
        };
        nodes.push(Node::start_in(
            Some(lab.ns(i)),
            |d| node_config(&lab, &keys, i, &peers, "", d),
            &[],
        ));
    }
    for node in &nodes {
        node.recv_until("READY=1", WAIT);
    }
    assert!(lab.ping(0, &mesh_ip(1), 5));

    let server_ip = mesh_ip(1);
    let listener = lab::in_netns(lab.netns_file(lab.ns(1)), move || {
        TcpListener::bind(format!("{server_ip}:7001")).unwrap()
    })
    .join()
    .unwrap();
    let echo = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        while let Ok(k) = conn.read(&mut buf) {
            if k == 0 || conn.write_all(&buf[..k]).is_err() {
                break;
            }
        }
    });
    let server_ip = mesh_ip(1);
    let client = lab::in_netns(lab.netns_file(lab.ns(0)), move || {
        let addr: std::net::SocketAddr = format!("{server_ip}:7001").parse().unwrap();
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let stop = Instant::now() + Duration::from_secs(8);
        let mut last = Instant::now();
        let mut worst = Duration::ZERO;
        let mut round_trips = 0u32;
        let mut buf = [0u8; 8];
        while Instant::now() < stop {
            conn.write_all(b"ping1234").expect("no reset while writing");
            conn.read_exact(&mut buf).expect("no reset while reading");
            worst = worst.max(last.elapsed());
            last = Instant::now();
            round_trips += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        (worst, round_trips)
    });

    // Node 2's peer entry comes and goes as a drop-in file, the way Ansible would manage it.
    let file = nodes[0].path("peers.d/node-2.toml");
    let write_peer = |extra: &str| {
        let block =
            peer_block(&lab, &keys, 2, extra).replace("[[network.wireguard.peers]]", "[[peers]]");
        let tmp = nodes[0].path("peers.d/.node-2.tmp");
        std::fs::write(&tmp, block).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    std::thread::sleep(Duration::from_secs(1));
    write_peer("");
    let added = time_to_reach(&lab, 0, &mesh_ip(2), Duration::from_secs(5))
        .expect("the peer added by file works without a SIGHUP");
    println!(
        "peer file added -> reachable: {:.0} ms",
        added.as_secs_f64() * 1000.0
    );
    std::thread::sleep(Duration::from_secs(1));
    write_peer("persistent_keepalive = 5");
    nodes[0].signal(Signal::SIGHUP);
    nodes[0].recv_until("READY=1", WAIT);
    std::thread::sleep(Duration::from_secs(1));
    std::fs::remove_file(&file).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !lab.ping(0, &mesh_ip(2), 1),
        "the peer whose file was removed is gone"
    );

    // A malformed peer file is rejected with its position; the other peers keep working.
    std::fs::write(
        nodes[0].path("peers.d/broken.toml"),
        "[[peers]]\nname = \"broken\"\npublic_key = \"not-a-key\"\nallowed_ips = [\"198.51.100.9/32\"]\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let doc = nodes[0].status_json();
    let problems = doc["mesh"]["problems"].to_string();
    assert!(
        problems.contains("broken.toml:3:14: peers[0].public_key"),
        "{problems}"
    );
    assert_eq!(doc["ready"], true);
    assert!(lab.ping(0, &mesh_ip(1), 2), "existing peers keep working");

    let (worst, round_trips) = client.join().unwrap();
    println!(
        "TCP stream node0 -> node1 during 3 reloads: {round_trips} round trips, worst gap {:.0} ms",
        worst.as_secs_f64() * 1000.0
    );
    assert!(worst < Duration::from_secs(1), "gap {worst:?}");
    nodes.clear();
    let _ = echo.join();
}

/// A peer whose preshared key file is missing or malformed is skipped and reported, never the
/// whole mesh: a drop-in file with such a peer is skipped whole (its good peers too), a bad peer
/// in the main config only itself; every other peer is on the device and the node is ready.
#[test]
fn a_peer_with_an_unusable_preshared_key_is_skipped_and_reported_while_the_rest_apply() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let keys = keys(6);
    let psk_dir = tempfile::tempdir().unwrap();
    let good_psk = psk_dir.path().join("good.psk");
    lab::sh(&format!("umask 077; wg genpsk > {}", good_psk.display()));
    let bad_psk = psk_dir.path().join("bad.psk");
    std::fs::write(&bad_psk, "not-a-preshared-key\n").unwrap();
    let missing_psk = psk_dir.path().join("missing.psk");
    let psk = |path: &Path| format!("preshared_key_file = \"{}\"", path.display());
    // Main config: node-1 with a good key, node-2 with a malformed one.
    let peers =
        peer_block(&lab, &keys, 1, &psk(&good_psk)) + &peer_block(&lab, &keys, 2, &psk(&bad_psk));
    let node = Node::start_in(
        Some(lab.ns(0)),
        |d| {
            let text = node_config(&lab, &keys, 0, &peers, "", d);
            let drop_in = |j: usize, extra: &str| {
                peer_block(&lab, &keys, j, extra)
                    .replace("[[network.wireguard.peers]]", "[[peers]]")
            };
            // good.toml: node-3. lost-psk.toml: node-4 (fine) and node-5 (missing key file).
            std::fs::write(d.join("peers.d/good.toml"), drop_in(3, "")).unwrap();
            std::fs::write(
                d.join("peers.d/lost-psk.toml"),
                drop_in(4, "") + &drop_in(5, &psk(&missing_psk)),
            )
            .unwrap();
            text
        },
        &[],
    );
    node.recv_until("READY=1", WAIT);

    let doc = node.status_json();
    assert_eq!(doc["ready"], true, "{doc}");
    let problems = doc["mesh"]["problems"].to_string();
    assert!(problems.contains("lost-psk.toml"), "{problems}");
    assert!(
        problems.contains(&missing_psk.display().to_string()),
        "{problems}"
    );
    assert!(problems.contains("node-2"), "{problems}");
    assert!(
        problems.contains(&bad_psk.display().to_string()),
        "{problems}"
    );
    assert!(!problems.contains("good.toml"), "{problems}");
    assert_eq!(doc["mesh"]["peers"], 2, "{doc}");

    let socket = node.path("run/clawnode.sock");
    let out = node.cli(&["peers", "--json", "--socket", socket.to_str().unwrap()]);
    support::succeeded(&out);
    let wg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut on_device: Vec<&str> = wg["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["public_key"].as_str().unwrap())
        .collect();
    on_device.sort_unstable();
    let mut expected = vec![keys.public[1].as_str(), keys.public[3].as_str()];
    expected.sort_unstable();
    assert_eq!(on_device, expected, "{wg}");
}
