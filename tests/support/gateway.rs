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
    let out = node.cli(args);
    assert!(
        out.status.success(),
        "clawnode {args:?} failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `clawnode gateway token create --json <args>` on the gateway's config: the `cbn1.` token.
pub fn create_token(gateway: &Node, args: &[&str]) -> String {
    let mut full = vec!["gateway", "token", "create", "--json"];
    full.extend_from_slice(args);
    let text = cli_ok(gateway, &full);
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
