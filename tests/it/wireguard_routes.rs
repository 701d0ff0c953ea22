//! Routes from peers' allowed IPs, and peer endpoint names, through the real binary in network
//! namespaces (the lab and addresses of `wireguard_mesh`: underlay 192.0.2.0/24, mesh
//! 198.51.100.0/24, node i at 198.51.100.(i+1)). Needs root; skipped (with a note) otherwise.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::lab::{self, Lab};
use crate::support::{self, Node};
use crate::wireguard_mesh::{Keys, WAIT, all_peers, keys, mesh_ip, node_config, peer_block};

/// Peer `j` as a drop-in file's `[[peers]]` table, with these allowed IPs.
fn drop_in(lab: &Lab, keys: &Keys, j: usize, allowed_ips: &[&str], extra: &str) -> String {
    let allowed: Vec<String> = allowed_ips.iter().map(|n| format!("\"{n}\"")).collect();
    peer_block(lab, keys, j, extra)
        .replace("[[network.wireguard.peers]]", "[[peers]]")
        .replace(
            &format!("allowed_ips = [\"{}/32\"]", mesh_ip(j)),
            &format!("allowed_ips = [{}]", allowed.join(", ")),
        )
}

fn routes(lab: &Lab, i: usize) -> String {
    let out = lab.exec(i, &["ip", "-4", "route"]);
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The public keys on node `node`'s device, sorted.
fn on_device(node: &Node) -> Vec<String> {
    let socket = node.path("run/clawnode.sock");
    let out = node.cli(&["peers", "--json", "--socket", socket.to_str().unwrap()]);
    support::succeeded(&out);
    let wg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut keys: Vec<String> = wg["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["public_key"].as_str().unwrap().to_string())
        .collect();
    keys.sort_unstable();
    keys
}

/// Drop-in files with a default route, a route over another peer's endpoint, or a missing
/// preshared key file are each skipped whole and listed in `problems`, with no route added for
/// them; every other peer is applied (packets flow) and the node is ready.
#[test]
fn a_default_route_an_endpoint_route_or_a_missing_preshared_key_skips_its_file_and_adds_no_route() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(2);
    let keys = keys(6);
    let psk_dir = tempfile::tempdir().unwrap();
    let missing_psk = psk_dir.path().join("missing.psk");
    let _node1 = Node::start_in(
        Some(lab.ns(1)),
        |d| node_config(&lab, &keys, 1, &all_peers(&lab, &keys, 1, 2), "", d),
        &[],
    );
    let peers = peer_block(&lab, &keys, 1, "");
    let node = Node::start_in(
        Some(lab.ns(0)),
        |d| {
            let text = node_config(&lab, &keys, 0, &peers, "", d);
            let write = |file: &str, body: String| {
                std::fs::write(d.join("peers.d").join(file), body).unwrap();
            };
            write(
                "default.toml",
                drop_in(&lab, &keys, 2, &["198.51.100.3/32", "0.0.0.0/0"], ""),
            );
            write(
                "lost-psk.toml",
                drop_in(
                    &lab,
                    &keys,
                    3,
                    &["198.51.100.4/32", "203.0.113.0/25"],
                    &format!("preshared_key_file = \"{}\"", missing_psk.display()),
                ),
            );
            // 192.0.2.2 is node 1's endpoint.
            write(
                "over-endpoint.toml",
                drop_in(&lab, &keys, 4, &["198.51.100.5/32", "192.0.2.2/32"], ""),
            );
            write(
                "site.toml",
                drop_in(&lab, &keys, 5, &["198.51.100.6/32", "203.0.113.128/25"], ""),
            );
            text
        },
        &[],
    );
    node.recv_until("READY=1", WAIT);

    let doc = node.status_json();
    assert_eq!(doc["ready"], true, "{doc}");
    let problems: Vec<String> = doc["mesh"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let about = |file: &str| -> String {
        problems
            .iter()
            .find(|p| p.contains(file))
            .unwrap_or_else(|| panic!("{file} not in {problems:#?}"))
            .clone()
    };
    assert!(
        about("default.toml").contains("0.0.0.0/0 is a default route"),
        "{problems:#?}"
    );
    assert!(
        about("lost-psk.toml").contains(&missing_psk.display().to_string()),
        "{problems:#?}"
    );
    assert!(
        about("over-endpoint.toml").contains("covers peer \"node-1\"'s endpoint 192.0.2.2"),
        "{problems:#?}"
    );
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert_eq!(doc["mesh"]["peers"], 2, "{doc}");
    let mut applied = vec![keys.public[1].clone(), keys.public[5].clone()];
    applied.sort_unstable();
    assert_eq!(on_device(&node), applied);
    assert!(
        lab.ping(0, &mesh_ip(1), 5),
        "node 0 cannot ping node 1 through the tunnel"
    );

    let table = routes(&lab, 0);
    let iface = lab.iface(0);
    assert!(
        table.contains(&format!("203.0.113.128/25 dev {iface}")),
        "{table}"
    );
    assert!(!table.contains("default"), "{table}");
    assert!(!table.contains("203.0.113.0/25"), "{table}");
    assert!(
        !table.contains(&format!("192.0.2.2 dev {iface}")),
        "{table}"
    );
}

/// The routes clawnode adds for peers' networks outside the mesh go when their drop-in file
/// goes, and on stop; a route it found already there (EEXIST) is never claimed or removed.
#[test]
fn removing_a_peer_file_removes_its_route_and_stop_removes_the_rest_but_never_anothers() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let keys = keys(4);
    // The operator's own route, to a network one peer also claims.
    lab::sh(&format!(
        "ip -n {} route add 203.0.113.192/26 via 192.0.2.254",
        lab.ns(0)
    ));
    let operators = "203.0.113.192/26 via 192.0.2.254";
    let mut node = Node::start_in(
        Some(lab.ns(0)),
        |d| {
            let text = node_config(&lab, &keys, 0, "", "[log]\nlevel = \"debug\"\n", d);
            let write = |file: &str, body: String| {
                std::fs::write(d.join("peers.d").join(file), body).unwrap();
            };
            write(
                "a.toml",
                drop_in(&lab, &keys, 1, &["198.51.100.2/32", "203.0.113.0/26"], ""),
            );
            write(
                "b.toml",
                drop_in(&lab, &keys, 2, &["198.51.100.3/32", "203.0.113.64/26"], ""),
            );
            write(
                "c.toml",
                drop_in(&lab, &keys, 3, &["198.51.100.4/32", "203.0.113.192/26"], ""),
            );
            text
        },
        &[],
    );
    node.recv_until("READY=1", WAIT);
    let iface = lab.iface(0);
    let table = routes(&lab, 0);
    for net in ["203.0.113.0/26", "203.0.113.64/26"] {
        assert!(table.contains(&format!("{net} dev {iface}")), "{table}");
    }
    assert!(table.contains(operators), "{table}");
    // node-3's network already had a route (EEXIST): clawnode added none beside it.
    assert!(
        !table.contains(&format!("203.0.113.192/26 dev {iface}")),
        "{table}"
    );

    std::fs::remove_file(node.path("peers.d/a.toml")).unwrap();
    support::wait_until(
        Duration::from_secs(5),
        "the route of the removed peer to go",
        &node,
        || !routes(&lab, 0).contains("203.0.113.0/26"),
    );
    assert!(
        routes(&lab, 0).contains(&format!("203.0.113.64/26 dev {iface}")),
        "{}",
        routes(&lab, 0)
    );

    // The peer claiming the operator's network goes: the operator's route stays.
    std::fs::remove_file(node.path("peers.d/c.toml")).unwrap();
    support::wait_until(Duration::from_secs(5), "node-3 to go", &node, || {
        node.status_json()["mesh"]["peers"] == 1
    });
    // The status is published after the reconcile's route step, so the routes are final.
    assert!(routes(&lab, 0).contains(operators), "{}", routes(&lab, 0));

    node.signal(Signal::SIGTERM);
    let (status, _) = node.wait_exit(Duration::from_secs(6));
    assert_eq!(status.code(), Some(0), "{}", node.stderr());
    let table = routes(&lab, 0);
    assert!(!table.contains("203.0.113.64/26"), "{table}");
    assert!(table.contains(operators), "{table}");
    // clawnode removed it itself, before the interface went.
    let log = node.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("removed route") && l.contains("203.0.113.64/26")),
        "{log}"
    );
}

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over /etc/resolv.conf for what
/// it runs in that namespace; removed on drop.
struct NetnsResolvConf(PathBuf);

impl NetnsResolvConf {
    fn new(ns: &str, text: &str) -> Self {
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        Self(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A peer whose endpoint name never resolves (its DNS server takes the query and never
/// answers) delays the other peers by no more than the resolve timeout, and a stop while the
/// name is being looked up returns at once.
#[test]
fn an_endpoint_name_that_never_resolves_delays_no_other_peer_and_no_stop() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(2);
    let keys = keys(3);
    // A DNS server on the underlay that reads nothing and answers nothing.
    lab::sh(&format!(
        "ip -n {} addr add 192.0.2.254/24 dev br0",
        lab.switch
    ));
    let _dns = lab::in_netns(lab.netns_file(&lab.switch), || {
        UdpSocket::bind("192.0.2.254:53").unwrap()
    })
    .join()
    .unwrap();
    let _resolv = NetnsResolvConf::new(
        lab.ns(0),
        "nameserver 192.0.2.254\noptions timeout:30 attempts:1\n",
    );
    let _node1 = Node::start_in(
        Some(lab.ns(1)),
        |d| node_config(&lab, &keys, 1, &all_peers(&lab, &keys, 1, 2), "", d),
        &[],
    );
    let peers = peer_block(&lab, &keys, 1, "")
        + &peer_block(&lab, &keys, 2, "").replace("192.0.2.3:51820", "stuck.invalid:51820");
    let debug = "[log]\nlevel = \"debug\"\n";
    let start = || {
        Node::start_in(
            Some(lab.ns(0)),
            |d| node_config(&lab, &keys, 0, &peers, debug, d),
            &[],
        )
    };

    // Stop while the name is being looked up.
    let mut node = start();
    support::wait_until(WAIT, "the endpoint lookup to start", &node, || {
        node.stderr().contains("resolving peer endpoint names")
    });
    std::thread::sleep(Duration::from_millis(300));
    node.signal(Signal::SIGTERM);
    let (status, took) = node.wait_exit(Duration::from_secs(60));
    println!(
        "stop during a hung endpoint lookup: exit after {:.0} ms",
        took.as_secs_f64() * 1000.0
    );
    assert_eq!(status.code(), Some(0), "{}", node.stderr());
    assert!(took < Duration::from_secs(2), "stop took {took:?}");

    // Start again: ready, and node 1 reachable, within the resolve timeout (3 s) and slack.
    let started = Instant::now();
    let node = start();
    node.recv_until("READY=1", WAIT);
    let ready = started.elapsed();
    assert!(lab.ping(0, &mesh_ip(1), 5), "node 1 unreachable");
    let reachable = started.elapsed();
    println!(
        "with a hung endpoint name: ready after {:.0} ms, node 1 reachable after {:.0} ms",
        ready.as_secs_f64() * 1000.0,
        reachable.as_secs_f64() * 1000.0
    );
    assert!(ready < Duration::from_secs(8), "ready after {ready:?}");
    let doc = node.status_json();
    assert_eq!(doc["ready"], true, "{doc}");
    assert_eq!(doc["mesh"]["peers"], 2, "{doc}");
    let problems = doc["mesh"]["problems"].to_string();
    assert!(
        problems.contains("node-2") && problems.contains("stuck.invalid:51820 not resolved"),
        "{problems}"
    );
}
