//! Gateway coordination in a lab: host 0 runs the real `clawnode run` with `[gateway] enabled`,
//! every other host is a node given nothing but a join token (the token carries the gateway's
//! URL, on the underlay, and the pin of the cluster identity). Underlay 192.0.2.0/24
//! (TEST-NET-1, host i at 192.0.2.(i+1)); mesh 198.51.100.0/24 (TEST-NET-2), the gateway at
//! 198.51.100.1, every other address assigned by the gateway.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::Node;
use super::lab::Lab;

/// The gateway's HTTPS port inside its namespace (not 443, to show `listen`/`public_url` work).
pub const GATEWAY_PORT: u16 = 8443;
pub const MESH_CIDR: &str = "198.51.100.0/24";
pub const GATEWAY_MESH_IP: &str = "198.51.100.1";

/// The `[network.wireguard]` part every lab host shares, with `extra` lines appended.
fn wireguard_table(lab: &Lab, i: usize, dir: &Path, extra: &str) -> String {
    let extra = format!("node_info_port = 51821\nreconcile_interval = \"1s\"\n{extra}");
    host_config(lab, i, dir, MESH_CIDR, &extra)
}

/// A lab host's whole config on `mesh_cidr`, with `extra` lines in `[network.wireguard]`
/// (they may open further tables after it).
pub fn host_config(lab: &Lab, i: usize, dir: &Path, mesh_cidr: &str, extra: &str) -> String {
    std::fs::create_dir_all(dir.join("peers.d")).expect("peers.d");
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
mesh_cidr = "{mesh_cidr}"
private_key_file = "{d}/wg.key"
peers_dir = "{d}/peers.d"
{extra}

[gpu]
enabled = false
"#,
        iface = lab.iface(i),
    )
}

/// Host `i` as the gateway: a fixed mesh address, HTTPS on the underlay.
pub fn gateway_config(lab: &Lab, i: usize, dir: &Path) -> String {
    let mut text = wireguard_table(lab, i, dir, &format!("address = \"{GATEWAY_MESH_IP}/24\""));
    text.push_str(&format!(
        "\n[gateway]\nenabled = true\nlisten = \"0.0.0.0:{GATEWAY_PORT}\"\npublic_url = \"https://{}:{GATEWAY_PORT}\"\n",
        lab.underlay(i)
    ));
    text
}

/// Host `i` as a node that joins with the token in `<dir>/join-token` (no address, no peers).
pub fn member_config(lab: &Lab, i: usize, dir: &Path) -> String {
    wireguard_table(
        lab,
        i,
        dir,
        &format!("join_token_file = \"{}/join-token\"", dir.display()),
    )
}

/// The WireGuard public key of a node's `<dir>/wg.key`, made now so tests know every key
/// before the daemon starts (the daemon would generate one the same way).
pub fn make_key(dir: &Path) -> String {
    let out = super::lab::sh(&format!(
        "umask 077; wg genkey > {p} && wg pubkey < {p}",
        p = dir.join("wg.key").display()
    ));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Run `clawnode <args> --config <node's config>` and fail the test unless it exits 0.
pub fn cli_ok(node: &Node, args: &[&str]) -> String {
    stdout_if_ok(&node.cli(args), &format!("clawnode {args:?}"))
}

/// `out`'s stdout; fails the test, naming `what`, unless it exited 0.
fn stdout_if_ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `clawnode gateway token create --json <args>` on the gateway's config: the `cbn1.` token.
pub fn create_token(gateway: &Node, args: &[&str]) -> String {
    create_token_with(args, |full| cli_ok(gateway, full))
}

/// `gateway token create --json <args>` run by `cli_ok`: the `cbn1.` token.
fn create_token_with(args: &[&str], cli_ok: impl FnOnce(&[&str]) -> String) -> String {
    let mut full = vec!["gateway", "token", "create", "--json"];
    full.extend_from_slice(args);
    let text = cli_ok(&full);
    let doc: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("token create --json is not JSON ({e}): {text}"));
    let token = doc["token"].as_str().unwrap_or_default().to_string();
    assert!(token.starts_with("cbn1."), "{doc}");
    token
}

/// A lab host: its daemon, its WireGuard public key.
pub struct Host {
    pub node: Node,
    pub key: String,
}

/// Every host in `among` pings every other one through the tunnel, at `ips` (their mesh
/// addresses, in `among`'s order). A pair gets three tries: under the whole suite's load a
/// first handshake initiation can be lost, and WireGuard only retries it after 5 s
/// (REKEY_TIMEOUT).
pub fn ping_all(lab: &Lab, hosts: &[Host], among: &[usize], ips: &[String]) {
    for (a, &i) in among.iter().enumerate() {
        for (b, &j) in among.iter().enumerate() {
            if a != b {
                assert!(
                    (0..3).any(|_| lab.ping(i, &ips[b], 5)),
                    "host {i} cannot ping host {j} at {}\n{}",
                    ips[b],
                    hosts[i].node.stderr()
                );
            }
        }
    }
}

/// A TLS client config that trusts only the CA certificates in PEM file `ca`.
pub fn tls_trusting(ca: &Path) -> rustls::ClientConfig {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth()
}

/// Set up host `i` as the gateway (`gateway init`, then start it); not waited for.
pub fn start_gateway(lab: &Lab, i: usize) -> Host {
    let mut node = Node::prepare(|d| gateway_config(lab, i, d));
    let key = make_key(node.dir.path());
    cli_ok(&node, &["gateway", "init"]);
    node.launch_in(Some(lab.ns(i)), &[]);
    Host { node, key }
}

/// Set up host `i` as a member with `token` in its token file and start it; not waited for.
pub fn start_member(lab: &Lab, i: usize, token: &str) -> Host {
    let mut node = Node::prepare(|d| member_config(lab, i, d));
    std::fs::write(node.path("join-token"), format!("{token}\n")).expect("token file");
    let key = make_key(node.dir.path());
    node.launch_in(Some(lab.ns(i)), &[]);
    Host { node, key }
}

/// The public keys configured on a userspace WireGuard device, read over its UAPI socket
/// (shared by all namespaces), sorted; empty when the device is not there.
pub fn device_peers(iface: &str) -> Vec<String> {
    let Ok(name) = iface.parse::<wireguard_control::InterfaceName>() else {
        return Vec::new();
    };
    let Ok(device) = wireguard_control::Device::get(&name, wireguard_control::Backend::Userspace)
    else {
        return Vec::new();
    };
    let mut keys: Vec<String> = device
        .peers
        .iter()
        .map(|p| p.config.public_key.to_base64())
        .collect();
    keys.sort_unstable();
    keys
}

/// The node's mesh address (no prefix) as its status API reports it.
pub fn mesh_address(node: &Node) -> String {
    let doc = node.status_json();
    let first = doc["mesh"]["wireguard"]["addresses"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no mesh address in status: {doc}"));
    first.split('/').next().unwrap_or_default().to_string()
}

/// `status --json`'s gateway object (`mesh.wireguard.gateway`): state live|cached|joining,
/// cursor, peers, snapshots and deltas applied since start.
pub fn gateway_status(node: &Node) -> serde_json::Value {
    node.status_json()["mesh"]["wireguard"]["gateway"].clone()
}

/// Poll `done` every `step` until it holds; `Some(elapsed)`, or `None` after `limit`.
pub fn time_until(
    limit: Duration,
    step: Duration,
    mut done: impl FnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(step);
    }
}

/// The gateway's `GET /v1/status` (its counters), asked from inside namespace `ns` with curl,
/// trusting only the cluster's CA and authorised by `session` (a node's bearer session).
pub fn v1_status(ns: &str, url: &str, ca: &Path, session: &str) -> serde_json::Value {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sS",
            "--fail-with-body",
            "--max-time",
            "5",
        ])
        .arg("--cacert")
        .arg(ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {session}"))
        .arg(format!("{url}/v1/status"))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "GET /v1/status: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("/v1/status is JSON")
}

/// The bearer session a node keeps in `<state_dir>/gateway-session.json`.
pub fn session_of(node: &Node) -> String {
    let text = std::fs::read_to_string(node.path("state/gateway-session.json"))
        .expect("gateway-session.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("session JSON");
    doc["session"].as_str().expect("session").to_string()
}

/// Percentile `p` (0-100) of `samples` (sorted here), nearest-rank.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

// ---- several gateways on one etcd cluster (issue 15) ----

/// The lab's etcd: its members run inside the lab's switch namespace on this address, given to
/// the bridge every host is plugged into, so every host's namespace reaches them directly.
pub const ETCD_IP: &str = "192.0.2.250";
/// Nodes' addresses come from the upper half of the mesh; the gateways' own fixed addresses
/// (198.51.100.<host + 1>) sit in the lower half, so no join can take one before a gateway
/// that starts later registers it.
pub const HA_POOL: &str = "198.51.100.128/25";

/// A three-member etcd cluster inside `lab`'s switch namespace at [`ETCD_IP`].
pub fn lab_etcd(lab: &Lab) -> super::etcd::EtcdCluster {
    super::lab::sh(&format!(
        "ip -n {} addr add {ETCD_IP}/24 dev br0",
        lab.switch
    ));
    super::etcd::EtcdCluster::start_on(3, ETCD_IP, Some(&lab.switch))
}

/// Gateway `i`'s public URL: its underlay address, port [`GATEWAY_PORT`].
pub fn gateway_url(lab: &Lab, i: usize) -> String {
    format!("https://{}:{GATEWAY_PORT}", lab.underlay(i))
}

/// Gateway `i`'s mesh address: 198.51.100.<i + 1>.
pub fn gateway_mesh_ip(i: usize) -> String {
    format!("198.51.100.{}", i + 1)
}

/// Host `i` as a gateway on the etcd cluster at `endpoints` (`store = "etcd"`), on the lab's
/// mesh: its own address 198.51.100.<i + 1>, nodes' addresses from [`HA_POOL`].
pub fn etcd_gateway_config(lab: &Lab, i: usize, dir: &Path, endpoints: &[String]) -> String {
    let own = format!("{}/24", gateway_mesh_ip(i));
    let extra = format!("node_info_port = 51821\nreconcile_interval = \"1s\"\naddress = \"{own}\"");
    etcd_gateway_config_on(lab, i, dir, endpoints, (MESH_CIDR, &extra, HA_POOL))
}

/// Host `i` as a gateway on the etcd cluster at `endpoints`, on `mesh` = (mesh CIDR, lines
/// for `[network.wireguard]` (its `address` among them), address pool for nodes).
pub fn etcd_gateway_config_on(
    lab: &Lab,
    i: usize,
    dir: &Path,
    endpoints: &[String],
    (mesh_cidr, wireguard, pool): (&str, &str, &str),
) -> String {
    let mut text = host_config(lab, i, dir, mesh_cidr, wireguard);
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    text.push_str(&format!(
        "\n[gateway]\nenabled = true\nlisten = \"0.0.0.0:{GATEWAY_PORT}\"\npublic_url = \"{}\"\n\
         address_pool = \"{pool}\"\nstore = \"etcd\"\netcd_endpoints = [{}]\n",
        gateway_url(lab, i),
        endpoints.join(", ")
    ));
    text
}

/// `clawnode <args> --config <node's config>` run inside namespace `ns` (where etcd is
/// reachable: the lab's etcd lives on the lab's bridge).
pub fn cli_in(ns: &str, node: &Node, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns, super::BIN])
        .args(args)
        .arg("--config")
        .arg(&node.config)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("run clawnode")
}

/// [`cli_in`], failing the test unless it exits 0; its stdout.
pub fn cli_ok_in(ns: &str, node: &Node, args: &[&str]) -> String {
    stdout_if_ok(
        &cli_in(ns, node, args),
        &format!("clawnode {args:?} in {ns}"),
    )
}

/// `clawnode gateway token create --json <args>` inside namespace `ns`: the `cbn1.` token.
pub fn create_token_in(ns: &str, gateway: &Node, args: &[&str]) -> String {
    create_token_with(args, |full| cli_ok_in(ns, gateway, full))
}

/// Gateways on hosts `0..count` with the configs `config(i, dir)` (all on one etcd cluster):
/// host 0 by `gateway init`, every other one by `gateway signer add` run on host 0 (the holder
/// of root.key), its output copied into the new gateway's `<state_dir>/gateway/` as an operator
/// would. All started and READY.
pub fn start_etcd_gateways(
    lab: &Lab,
    count: usize,
    config: impl Fn(usize, &Path) -> String,
) -> Vec<Host> {
    let mut first = Node::prepare(|d| config(0, d));
    let key = make_key(first.dir.path());
    cli_ok_in(lab.ns(0), &first, &["gateway", "init"]);
    first.launch_in(Some(lab.ns(0)), &[]);
    let mut hosts = vec![Host { node: first, key }];
    for i in 1..count {
        let mut node = Node::prepare(|d| config(i, d));
        let key = make_key(node.dir.path());
        let out = node.path("signer-out");
        let underlay = lab.underlay(i);
        cli_ok_in(
            lab.ns(0),
            &hosts[0].node,
            &[
                "gateway",
                "signer",
                "add",
                &format!("gw-{i}"),
                "--url",
                &gateway_url(lab, i),
                "--address",
                &underlay,
                "--out",
                out.to_str().expect("utf-8 path"),
            ],
        );
        let state = node.path("state/gateway");
        super::lab::sh(&format!(
            "umask 077; mkdir -p {s} && cp -a {o}/. {s}/",
            s = state.display(),
            o = out.display()
        ));
        node.launch_in(Some(lab.ns(i)), &[]);
        hosts.push(Host { node, key });
    }
    for host in &hosts {
        host.node.recv_until("READY=1", Duration::from_secs(60));
    }
    hosts
}

/// `token` with its gateway URL list replaced by `urls` (the list is not signed: it only says
/// where to send the join, the pinned root key proves whom the node talks to).
pub fn with_urls(token: &str, urls: &[String]) -> String {
    use base64::Engine as _;
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    assert_eq!(parts.len(), 5, "a cbn1 token has five parts");
    parts[4] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(urls.join(","));
    parts.join(".")
}

/// The gateway URLs listed in `token`.
pub fn token_urls(token: &str) -> Vec<String> {
    use base64::Engine as _;
    let last = token.rsplit('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(last)
        .expect("token URL list is base64url");
    String::from_utf8(bytes)
        .expect("utf-8")
        .split(',')
        .map(str::to_string)
        .collect()
}

/// Wait until host `i`'s device holds exactly `want` (sorted); fails with the node's log.
pub fn wait_for_device(lab: &Lab, i: usize, node: &Node, want: &[String], limit: Duration) {
    let iface = lab.iface(i);
    let got = time_until(limit, Duration::from_millis(20), || {
        device_peers(&iface) == want
    });
    assert!(
        got.is_some(),
        "host {i} never had exactly the expected peers: want {want:?}, have {:?}\n{}",
        device_peers(&iface),
        node.stderr()
    );
}

/// A ping running without pause (every 200 ms) from a lab host to a mesh address, until
/// `finish` stops it and reads its count of replies.
pub struct Pinger {
    pub from: usize,
    pub to: String,
    child: Option<std::process::Child>,
}

impl Pinger {
    pub fn start(lab: &Lab, from: usize, to: &str) -> Pinger {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                lab.ns(from),
                "ping",
                "-n",
                "-i",
                "0.2",
                "-W",
                "1",
                to,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ping");
        Pinger {
            from,
            to: to.to_string(),
            child: Some(child),
        }
    }

    /// Stop it and return (pings up to the last one answered, how many of those were
    /// answered). Pings still in flight when it is stopped are not counted as lost.
    pub fn finish(mut self) -> (u64, u64) {
        let child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let out = child.wait_with_output().expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout);
        let answered: std::collections::BTreeSet<u64> = text
            .lines()
            .filter(|l| l.contains(" bytes from "))
            .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        let last = answered.last().copied().unwrap_or(0);
        (last, answered.len() as u64)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
