//! Gateway coordination for real: network namespaces, the real binary, userspace WireGuard
//! (wireguard-go), real packets. Host 0 is the gateway (`clawnode gateway init`, `[gateway]
//! enabled`); every other host is given nothing but a join token from `clawnode gateway token
//! create` (which carries the gateway's URL). Addresses: see `support::gateway`. Needs root;
//! skipped (with a note) otherwise.
//!
//! Figures (token to READY, propagation of a join and of a revocation) are printed; run with
//! `--nocapture` to see them.

use std::time::{Duration, Instant};

use crate::support::gateway::{
    self, GATEWAY_MESH_IP, GATEWAY_PORT, Host, create_token, device_peers, ms, start_gateway,
    start_member, time_until,
};
use crate::support::lab::{self, Lab};
use crate::support::{self, Node};

const WAIT: Duration = Duration::from_secs(30);
/// The promise: a join or a revocation is on every other node's device within a second.
const PROPAGATION: Duration = Duration::from_secs(1);

/// A gateway on host 0 and members on hosts 1..=members, all READY with every peer on their
/// devices; the hosts after them are left free for the test.
struct Cluster {
    lab: Lab,
    hosts: Vec<Host>,
}

impl Cluster {
    fn start(hosts: usize, members: usize) -> Cluster {
        let lab = Lab::new(hosts);
        let gw = start_gateway(&lab, 0);
        gw.node.recv_until("READY=1", WAIT);
        let mut all = vec![gw];
        for i in 1..=members {
            let token = create_token(&all[0].node, &[]);
            all.push(start_member(&lab, i, &token));
        }
        let cluster = Cluster { lab, hosts: all };
        // Timed on one thread per member, so a slow one does not delay the others' figures.
        let figures: Vec<(Duration, Duration)> = std::thread::scope(|s| {
            let threads: Vec<_> = (1..=members)
                .map(|i| {
                    let cluster = &cluster;
                    s.spawn(move || {
                        let node = cluster.node(i);
                        node.recv_until("READY=1", WAIT);
                        let ready = node.started.elapsed();
                        cluster.wait_for_all_peers(i);
                        (ready, node.started.elapsed())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let to_ready = figures.iter().map(|f| f.0);
        let to_peers = figures.iter().map(|f| f.1);
        println!(
            "token -> READY=1: max {}; token -> every peer on the device: max {} ({members} nodes started together)",
            ms(to_ready.max().unwrap()),
            ms(to_peers.max().unwrap()),
        );
        cluster.wait_for_all_peers(0);
        cluster
    }

    fn node(&self, i: usize) -> &Node {
        &self.hosts[i].node
    }

    /// The keys host `i` should have on its device: every other host that runs.
    fn expected_peers(&self, i: usize) -> Vec<String> {
        let mut keys: Vec<String> = (0..self.hosts.len())
            .filter(|&j| j != i)
            .map(|j| self.hosts[j].key.clone())
            .collect();
        keys.sort_unstable();
        keys
    }

    fn wait_for_all_peers(&self, i: usize) {
        let want = self.expected_peers(i);
        let iface = self.lab.iface(i);
        let got = time_until(WAIT, Duration::from_millis(20), || {
            device_peers(&iface) == want
        });
        assert!(
            got.is_some(),
            "host {i} never had every peer: want {want:?}, have {:?}\n{}",
            device_peers(&iface),
            self.node(i).stderr()
        );
    }

    fn mesh_ip(&self, i: usize) -> String {
        if i == 0 {
            return GATEWAY_MESH_IP.to_string();
        }
        gateway::mesh_address(self.node(i))
    }

    /// Every host in `among` pings every other one through the tunnel (three tries a pair).
    fn ping_all(&self, among: &[usize]) {
        let ips: Vec<String> = among.iter().map(|&i| self.mesh_ip(i)).collect();
        gateway::ping_all(&self.lab, &self.hosts, among, &ips);
    }

    fn gateway_url(&self) -> String {
        format!("https://{}:{GATEWAY_PORT}", self.lab.underlay(0))
    }

    /// The gateway's own counters (`GET /v1/status`), asked with host `via`'s session.
    fn gateway_counters(&self, via: usize) -> serde_json::Value {
        gateway::v1_status(
            self.lab.ns(via),
            &self.gateway_url(),
            &self.node(0).path("state/gateway/ca.pem"),
            &gateway::session_of(self.node(via)),
        )
    }
}

/// When every host in `watchers` has `key` on its device (`present`) or no longer has it,
/// measured from `since`; polls the devices every 2 ms on one thread per host.
fn propagation(
    lab: &Lab,
    watchers: &[usize],
    key: &str,
    present: bool,
    since: Instant,
) -> Vec<(usize, Option<Duration>)> {
    let threads: Vec<_> = watchers
        .iter()
        .map(|&i| {
            let iface = lab.iface(i);
            let key = key.to_string();
            std::thread::spawn(move || {
                let hit = time_until(WAIT, Duration::from_millis(2), || {
                    device_peers(&iface).contains(&key) == present
                });
                (i, hit.map(|_| since.elapsed()))
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Snapshots a node applied since it started (`status --json`).
fn snapshots_received(node: &Node) -> u64 {
    let doc = gateway::gateway_status(node);
    doc["snapshots"]
        .as_u64()
        .unwrap_or_else(|| panic!("no snapshot count in {doc}"))
}

#[test]
fn nodes_given_only_a_token_ping_each_other_and_a_fifth_node_is_on_every_device_within_a_second() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    // Gateway + three members; host 4 joins later.
    let mut cluster = Cluster::start(5, 3);
    cluster.ping_all(&[0, 1, 2, 3]);

    // Every member's address came from the gateway, inside the mesh, none twice.
    let mut addresses: Vec<String> = (0..4).map(|i| cluster.mesh_ip(i)).collect();
    for a in &addresses {
        assert!(a.starts_with("198.51.100."), "{addresses:?}");
    }
    addresses.sort_unstable();
    addresses.dedup();
    assert_eq!(addresses.len(), 4, "{addresses:?}");

    // STATUS and status --json say the peers come live from the gateway.
    let state = gateway::gateway_status(cluster.node(1));
    assert_eq!(state["state"], "live", "{state}");
    // The gateway node's own status shows what its gateway role serves: itself and three
    // members, each joined once with a token.
    let role = cluster.node(0).status_json()["gateway_role"].clone();
    assert_eq!(role["sessions"], 4, "{role}");
    assert_eq!(role["joins"], 3, "{role}");
    assert!(role["deltas_sent"].as_u64().unwrap_or(0) > 0, "{role}");
    assert!(cluster.node(1).status_json().get("gateway_role").is_none());

    // The fourth member joins: from its join (its session written) to its key on each of the
    // other four devices.
    let token = create_token(cluster.node(0), &[]);
    let joiner = start_member(&cluster.lab, 4, &token);
    let key = joiner.key.clone();
    let session = joiner.node.path("state/gateway-session.json");
    cluster.hosts.push(joiner);
    let watch = std::thread::scope(|s| {
        let t0 = Instant::now();
        let lab = &cluster.lab;
        let key = key.as_str();
        let seen = s.spawn(move || propagation(lab, &[0, 1, 2, 3], key, true, t0));
        let joined = time_until(WAIT, Duration::from_millis(1), || session.exists())
            .expect("the new node joined (wrote its session)");
        (joined, seen.join().unwrap())
    });
    let (joined, seen) = watch;
    let mut worst = Duration::ZERO;
    for (i, at) in &seen {
        let at = at.unwrap_or_else(|| {
            panic!(
                "host {i} never configured the new node\n{}",
                cluster.node(*i).stderr()
            )
        });
        let after_join = at.saturating_sub(joined);
        println!(
            "new node on host {i}'s device {} after its join",
            ms(after_join)
        );
        worst = worst.max(after_join);
    }
    println!(
        "a joining node is on every other device within {} of its join (target 1 s); its own READY=1 {} after start",
        ms(worst),
        ms({
            cluster.node(4).recv_until("READY=1", WAIT);
            cluster.node(4).started.elapsed()
        })
    );
    assert!(worst <= PROPAGATION, "{}", ms(worst));
    cluster.wait_for_all_peers(4);
    cluster.ping_all(&[0, 1, 2, 3, 4]);
}

#[test]
fn with_the_gateway_down_tunnels_stay_up_and_a_restarted_node_is_ready_from_its_cache_then_all_catch_up_and_a_revoked_node_is_dropped_within_a_second()
 {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut cluster = Cluster::start(4, 3);
    cluster.ping_all(&[0, 1, 2, 3]);
    let snapshots_before: Vec<u64> = (1..4)
        .map(|i| snapshots_received(cluster.node(i)))
        .collect();

    // The gateway dies hard: the members keep their tunnels.
    cluster.hosts[0].node.kill9();
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(3) {
        cluster.ping_all(&[1, 2, 3]);
    }
    for i in 1..4 {
        let state = time_until(WAIT, Duration::from_millis(200), || {
            gateway::gateway_status(cluster.node(i))["state"] == "cached"
        });
        assert!(
            state.is_some(),
            "host {i} never said it runs on its cache: {}",
            gateway::gateway_status(cluster.node(i))
        );
        assert_eq!(cluster.node(i).status_json()["ready"], true);
    }

    // A member restarted while the gateway is down comes up from its cache alone, and knows
    // its gateways from the cache too (with several, it would fail over to the next).
    let url = cluster.gateway_url();
    let node2 = &mut cluster.hosts[2].node;
    node2.stop(WAIT);
    let cache: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node2.path("state/peerset.json")).unwrap()).unwrap();
    assert_eq!(cache["gateways"], serde_json::json!([url]), "{cache}");
    assert_eq!(cache["gateway"], url.as_str());
    node2.restart();
    let seen = node2.recv_until("READY=1", WAIT);
    let status = support::last_status(&seen);
    println!(
        "restart with the gateway down -> READY=1 in {}: {status}",
        ms(node2.started.elapsed())
    );
    assert!(status.contains("cached"), "{status}");
    let doc = gateway::gateway_status(node2);
    assert_eq!(doc["gateways"], serde_json::json!([url]), "{doc}");
    assert_eq!(doc["current"], url.as_str(), "{doc}");
    assert_eq!(
        device_peers(&cluster.lab.iface(2)),
        cluster.expected_peers(2),
        "peers from the cache"
    );
    cluster.ping_all(&[1, 2, 3]);

    // The gateway returns: everyone is live again, with deltas from their cursors.
    cluster.hosts[0].node.restart();
    cluster.node(0).recv_until("READY=1", WAIT);
    for i in 1..4 {
        let live = time_until(WAIT, Duration::from_millis(100), || {
            gateway::gateway_status(cluster.node(i))["state"] == "live"
        });
        let live = live.unwrap_or_else(|| {
            panic!(
                "host {i} never went live again: {}\n{}",
                gateway::gateway_status(cluster.node(i)),
                cluster.node(i).stderr()
            )
        });
        println!("host {i} live again {} after the gateway's READY", ms(live));
    }
    let snapshots_after: Vec<u64> = (1..4)
        .map(|i| snapshots_received(cluster.node(i)))
        .collect();
    let counters = cluster.gateway_counters(1);
    println!("gateway counters after its restart: {counters}");
    // Node 2 restarted: its counter started again from zero, so only "no new snapshot" counts.
    assert_eq!(
        snapshots_after[0], snapshots_before[0],
        "host 1 took a snapshot"
    );
    assert_eq!(
        snapshots_after[1], 0,
        "host 2 (restarted from cache) took a snapshot"
    );
    assert_eq!(
        snapshots_after[2], snapshots_before[2],
        "host 3 took a snapshot"
    );
    assert_eq!(
        counters["snapshots_sent"], 0,
        "the restarted gateway served snapshots: {counters}"
    );
    assert!(
        counters["deltas_sent"].as_u64() > Some(0),
        "no deltas: {counters}"
    );

    // Revoking host 3: the others drop it within a second of the command returning.
    let revoked_key = cluster.hosts[3].key.clone();
    let start = Instant::now();
    let seen = std::thread::scope(|s| {
        let lab = &cluster.lab;
        let key = revoked_key.as_str();
        let seen = s.spawn(move || propagation(lab, &[0, 1, 2], key, false, start));
        gateway::cli_ok(cluster.node(0), &["gateway", "revoke", "node-3"]);
        (start.elapsed(), seen.join().unwrap())
    });
    let (command, seen) = seen;
    let mut worst = Duration::ZERO;
    for (i, at) in &seen {
        let at = at.unwrap_or_else(|| panic!("host {i} kept the revoked node"));
        println!(
            "revoked node gone from host {i}'s device {} after `gateway revoke` returned",
            ms(at.saturating_sub(command))
        );
        worst = worst.max(at.saturating_sub(command));
    }
    println!(
        "a revoked node is dropped everywhere within {} (target 1 s; the command itself took {})",
        ms(worst),
        ms(command)
    );
    assert!(worst <= PROPAGATION, "{}", ms(worst));
    let ip3 = cluster.mesh_ip(3);
    assert!(
        !cluster.lab.ping(1, &ip3, 1),
        "the revoked node is unreachable"
    );
    cluster.ping_all(&[0, 1, 2]);
}

/// Gateway + 2 members; with the gateway down, host 1 is stopped, its cached record of host 2
/// given another WireGuard key (an attacker with write access to the cache file), and host 1
/// started again on that cache. Returns the cluster and the forged key.
fn tampered_cache() -> (Cluster, String) {
    let mut cluster = Cluster::start(3, 2);
    cluster.ping_all(&[0, 1, 2]);
    cluster.hosts[0].node.kill9();
    let node1 = &mut cluster.hosts[1].node;
    node1.stop(WAIT);
    let cache_path = node1.path("state/peerset.json");
    let mut cache: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cache_path).unwrap()).unwrap();
    let forged = lab::wg_key(node1.dir.path(), "forged").1;
    let victim = cluster.hosts[2].key.clone();
    let mut tampered = 0;
    for record in cache["records"]
        .as_array_mut()
        .expect("records in the cache")
    {
        if record["wg_key"] == victim.as_str() {
            record["wg_key"] = forged.clone().into();
            tampered += 1;
        }
    }
    assert_eq!(tampered, 1, "host 2's record in the cache: {cache}");
    std::fs::write(&cache_path, serde_json::to_vec_pretty(&cache).unwrap()).unwrap();
    let node1 = &mut cluster.hosts[1].node;
    node1.restart();
    node1.recv_until("READY=1", WAIT);
    (cluster, forged)
}

#[test]
fn a_tampered_record_in_the_cache_is_rejected_and_never_reaches_the_device() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let (cluster, forged) = tampered_cache();
    let victim = &cluster.hosts[2].key;
    let on_device = device_peers(&cluster.lab.iface(1));
    assert!(
        !on_device.contains(&forged),
        "the forged key is on the device"
    );
    assert!(
        !on_device.contains(victim),
        "host 2's key came back from a record whose signature no longer matches"
    );
    assert!(
        on_device.contains(&cluster.hosts[0].key),
        "the untouched records still apply: {on_device:?}"
    );
    let log = cluster.node(1).stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("peer cache") && l.contains("signature does not verify")),
        "the rejection is logged:\n{log}"
    );
}

#[test]
fn a_node_that_rejected_part_of_its_cache_gets_the_real_record_once_the_gateway_is_back() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let (mut cluster, forged) = tampered_cache();
    // The gateway returns: host 1's cursor is current, but its set lacks host 2's record, so
    // it must not settle for "nothing changed".
    cluster.hosts[0].node.restart();
    cluster.node(0).recv_until("READY=1", WAIT);
    cluster.wait_for_all_peers(1);
    assert!(!device_peers(&cluster.lab.iface(1)).contains(&forged));
    cluster.ping_all(&[1, 2]);
}

/// Waits for a node given a bad token to say why, in STATUS or its log, or to exit.
fn refusal(node: &mut Node, words: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut said = String::new();
    while Instant::now() < deadline {
        for datagram in node.drain(Duration::from_millis(200)) {
            for line in datagram {
                if let Some(status) = line.strip_prefix("STATUS=") {
                    said = status.to_string();
                }
                assert_ne!(line, "READY=1", "a refused node became ready: {said}");
            }
        }
        if said.contains(words) || node.stderr().contains(words) {
            return said;
        }
        if let Some(child) = node.child.as_mut()
            && child.try_wait().unwrap().is_some()
        {
            node.child = None;
            break;
        }
    }
    let log = node.stderr();
    assert!(
        said.contains(words) || log.contains(words),
        "no \"{words}\" in STATUS ({said}) or the log:\n{log}"
    );
    said
}

#[test]
fn a_reused_or_expired_token_is_refused_with_a_clear_message() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let cluster = Cluster::start(4, 1);
    // Host 1 joined with its token; the same token again on host 2.
    let used = std::fs::read_to_string(cluster.node(1).path("join-token")).unwrap();
    let mut reused = start_member(&cluster.lab, 2, used.trim());
    let said = refusal(&mut reused.node, "token already used");
    println!("reused token: {said}");
    assert!(!reused.node.path("state/gateway-session.json").exists());

    // A token that ran out before it was used.
    let expired = create_token(cluster.node(0), &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let mut late = start_member(&cluster.lab, 3, &expired);
    let said = refusal(&mut late.node, "token expired");
    println!("expired token: {said}");

    // Neither appears on the gateway's list.
    let listed = gateway::cli_ok(cluster.node(0), &["gateway", "nodes", "--json"]);
    assert!(
        !listed.contains(&reused.key) && !listed.contains(&late.key),
        "{listed}"
    );
}
