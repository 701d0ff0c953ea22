//! The fuzz targets' bodies: one function per parser that takes arbitrary bytes, feeds them to
//! the code that reads untrusted input, and panics when a property that must hold does not.
//!
//! `tests/fuzz` (cargo-fuzz, libFuzzer) calls these; the unit tests below replay every saved
//! input (`tests/fuzz/corpus/<target>/`, `tests/fuzz/regressions/<target>/`) on stable Rust,
//! so a crash once found stays fixed. Nothing in the daemon calls this module.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::api::{Sources, StatusDoc};
use crate::config::{self, ConfigErrors};
use crate::core::coord::{
    self, Advert, CacheFile, Grace, JoinToken, NodeRecord, PeerSet, Revocation, RootKey, Session,
    SignerCert, Update,
};
use crate::core::model::ServiceAd;
use crate::core::serve_config::{self, Mode, WantedService};
use crate::core::tailscale_relay::{PathKind, summary_line};
use crate::http::Limits;
use crate::mesh::Live;
use crate::mesh::tailscale::localapi::{self, Version};
use crate::mesh::tailscale::types::{CheckPrefs, Notify, Prefs, Status};
use crate::mesh::tailscale::{Ndjson, discover as ts_discover, status as ts_status};
use crate::services::discover;
use crate::services::node_info::{self, NodeInfo};

/// A target's body: any bytes in, a panic when a property fails.
pub type Target = fn(&[u8]);

/// Every target: its name (the cargo-fuzz target and corpus directory) and its body.
pub const TARGETS: [(&str, Target); 11] = [
    ("config", config),
    ("peers_file", peers_file),
    ("localapi", localapi),
    ("ipn_bus", ipn_bus),
    ("node_info_http", node_info_http),
    ("api_http", api_http),
    ("discover_answer", discover_answer),
    ("join_token", join_token),
    ("coord_record", coord_record),
    ("peer_cache", peer_cache),
    ("gateway_request", gateway_request),
];

/// The main configuration file, as `clawnode run` and `check-config` read it.
pub fn config(data: &[u8]) {
    let path = Path::new("fuzz.toml");
    match config::parse_bytes(path, data.to_vec()) {
        Ok(config) => {
            let _ = config.summary();
        }
        Err(errors) => check_positions(data, &errors),
    }
}

/// A drop-in file in `peers_dir`.
pub fn peers_file(data: &[u8]) {
    // The daemon reads peer files as UTF-8 and refuses any other before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse_peers(Path::new("fuzz-peer.toml"), text) {
        Ok(peers) => {
            for peer in peers {
                assert!(!peer.name.is_empty(), "a peer without a name was accepted");
            }
        }
        Err(errors) => check_positions(data, &errors),
    }
}

/// Errors name a real place in the file: at least one of them, each on an existing line, at a
/// column no further than one past that line's end.
fn check_positions(data: &[u8], errors: &ConfigErrors) {
    assert!(!errors.0.is_empty(), "refused without saying why");
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.split('\n').collect();
    for error in errors.iter() {
        let shown = error.to_string();
        assert!(
            error.line >= 1 && error.line <= lines.len(),
            "line out of the file: {shown}"
        );
        let width = lines[error.line - 1].chars().count();
        assert!(
            error.col >= 1 && error.col <= width + 1,
            "column out of line {} ({width} characters): {shown}",
            error.line
        );
    }
}

/// One tailscaled LocalAPI answer body, read as every reply clawnode decodes: status, prefs,
/// check-prefs, a bus message, the serve config, whois, `GET services`, an error body; then
/// what clawnode builds from them.
pub fn localapi(data: &[u8]) {
    let _ = localapi::error_message(data);
    let text = String::from_utf8_lossy(data);
    let _ = Version::parse(&text);
    let _ = localapi::classify(
        "GET fuzz",
        hyper::StatusCode::TOO_MANY_REQUESTS,
        data,
        Some(&text),
    );
    let _ = serde_json::from_slice::<CheckPrefs>(data);
    let _ = serde_json::from_slice::<Notify>(data);
    let status = serde_json::from_slice::<Status>(data).ok();
    if let Some(status) = &status {
        let _ = status.approved_services();
        check_paths(status);
    }
    let prefs = serde_json::from_slice::<Prefs>(data).ok();
    if let Some(prefs) = &prefs {
        check_prefs_round_trip(prefs);
    }
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    check_serve_config_edits(&value, prefs.as_ref());
    // The same document as `GET services`, or as the status whose CapMap stands in for it.
    let _ = ts_discover::named(&value, Some(&value), "molt-provider");
    let _ = ts_discover::named(&value, None, "molt-provider");
    if let (Some(status), Some(prefs)) = (&status, &prefs) {
        TARGET.with(|target| {
            let _ = ts_status::build(status, prefs, &value, Some(&value), target);
        });
    }
}

thread_local! {
    /// What the status document is built against: two services, one failed publish.
    static TARGET: ts_status::Target = ts_status::Target {
        api: localapi::LocalApi::new(Path::new("/nonexistent/tailscaled.sock")),
        services: ["molt-provider", "gateway"]
            .iter()
            .map(|name| ServiceAd {
                name: (*name).to_string(),
                port: 8443,
                protocol: "tcp".into(),
            })
            .collect(),
        publish_error: None,
        certs: Default::default(),
        relay_wanted: Some(40000),
        relay_problem: None,
    };
}

/// Every peer gets exactly one path: the counts add up to the peers, by path and by summary.
fn check_paths(status: &Status) {
    for serving in [false, true] {
        let Some(paths) = ts_status::paths_doc(status, serving) else {
            assert!(status.peers.is_none(), "a peers map yields paths");
            return;
        };
        let counts = &paths.counts;
        let peers = status
            .peers
            .as_ref()
            .map_or(0, |p| p.values().filter(|peer| peer.listed()).count());
        assert_eq!(counts.total, peers, "one path per peer");
        assert_eq!(paths.peers.len(), peers);
        let by_kind: usize = PathKind::ALL.iter().map(|k| counts.count(*k)).sum();
        assert_eq!(by_kind, counts.total, "the paths add up: {counts:?}");
        let hinted = paths.peers.iter().filter(|p| p.hint.is_some()).count();
        assert!(hinted <= counts.count(PathKind::Derp), "hints only on DERP");
        assert_eq!(paths.relay_available, serving || counts.peer_relay > 0);
        let summary = summary_line(counts);
        assert_eq!(summary, paths.summary);
        if peers > 0 {
            assert!(summary.starts_with(&format!("{peers} peer")), "{summary}");
        }
    }
}

/// `start` writes the prefs back whole: what was read must survive a write and a read.
fn check_prefs_round_trip(prefs: &Prefs) {
    let written = serde_json::to_value(prefs).expect("prefs serialize");
    let again: Prefs = serde_json::from_value(written.clone()).expect("written prefs parse");
    let rewritten = serde_json::to_value(&again).expect("prefs serialize");
    assert_eq!(
        written, rewritten,
        "prefs changed through a write and a read"
    );
}

/// clawnode edits only its own `svc:` entries of the serve config and leaves the rest alone.
fn check_serve_config_edits(current: &Value, prefs: Option<&Prefs>) {
    let wanted = [
        WantedService {
            label: "molt-provider".into(),
            port: 8443,
            mode: Mode::Tcp,
        },
        WantedService {
            label: "gateway".into(),
            port: 443,
            mode: Mode::Http { tls: true },
        },
    ];
    let owned: BTreeSet<String> = ["svc:molt-provider", "svc:old"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (edited, now_owned) = serve_config::reconcile(current, &owned, &wanted, "tail1.ts.net");
    let (again, _) = serve_config::reconcile(&edited, &now_owned, &wanted, "tail1.ts.net");
    assert_eq!(edited, again, "a second reconcile changed the serve config");
    let withdrawn = serve_config::withdraw(&edited, &now_owned);
    if current.is_object() {
        let others = |config: &Value| -> Vec<(String, Value)> {
            let empty = serde_json::Map::new();
            let map = config.as_object().unwrap_or(&empty);
            map.iter()
                .filter(|(k, _)| *k != "Services")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let before_others = others(current);
        assert_eq!(
            before_others,
            others(&edited),
            "reconcile touched another key"
        );
        assert_eq!(
            before_others,
            others(&withdrawn),
            "withdraw touched another key"
        );
        let services = |config: &Value| config.get("Services").and_then(Value::as_object).cloned();
        let theirs = |config: &Value| -> Vec<(String, Value)> {
            services(config)
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| !owned.contains(k) && !now_owned.contains(k))
                .collect()
        };
        assert_eq!(
            theirs(current),
            theirs(&edited),
            "reconcile touched a service it does not own"
        );
        assert_eq!(
            theirs(current),
            theirs(&withdrawn),
            "withdraw touched a service it does not own"
        );
    }
    for name in &now_owned {
        assert!(
            withdrawn["Services"].get(name).is_none(),
            "{name} still there after withdraw"
        );
    }
    if let Some(prefs) = prefs {
        // Every wanted name is advertised, an owned one no longer wanted is not, and the names
        // of others keep their order.
        let advertised = serve_config::advertise(prefs.services(), &owned, &wanted);
        for name in &now_owned {
            assert!(
                advertised.contains(name),
                "{name} not advertised: {advertised:?}"
            );
        }
        assert!(!advertised.iter().any(|n| n == "svc:old"), "{advertised:?}");
        let others = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .filter(|n| !owned.contains(*n) && !now_owned.contains(*n))
                .cloned()
                .collect()
        };
        assert_eq!(
            others(prefs.services()),
            others(&advertised),
            "others' names changed"
        );
    }
}

/// The IPN bus splitter. The first byte sets the chunk size the stream arrives in, the second
/// the line limit; the rest is the stream. However it is cut into chunks, the messages that
/// come out are those of its complete lines no longer than the limit, in order, and no more
/// than the limit is ever held.
pub fn ipn_bus(data: &[u8]) {
    let [chunk, limit, stream @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk % 64) + 1;
    let limit = usize::from(*limit) * 8 + 1;
    let mut lines = Ndjson::with_max_line(limit);
    let mut got = Vec::new();
    for part in stream.chunks(chunk) {
        got.extend(lines.push(part).iter().map(|n| format!("{n:?}")));
        assert!(lines.held() <= limit, "held {} > {limit}", lines.held());
    }
    let mut complete: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    complete.pop(); // The part after the last newline is not a line yet.
    let expected: Vec<String> = complete
        .into_iter()
        .filter(|line| line.len() <= limit)
        .filter_map(|line| serde_json::from_slice::<Notify>(line).ok())
        .map(|n| format!("{n:?}"))
        .collect();
    assert_eq!(got, expected, "chunks of {chunk}, limit {limit}");
}

thread_local! {
    /// One runtime per thread for the HTTP targets; the connections run on it to the end. Its
    /// clock is paused and jumps ahead whenever nothing else can run, so a client that stops
    /// sending meets the header timeout and the deadline at once, in virtual time.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
}

/// Raw bytes from a caller to the node-info endpoint: through hyper, the limits, the router.
pub fn node_info_http(data: &[u8]) {
    check_reply(&node_info_reply(data));
}

fn node_info_reply(data: &[u8]) -> Vec<u8> {
    let info = Arc::new(RwLock::new(NodeInfo {
        name: "gpu-01".into(),
        public_key: "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".into(),
        address: "10.100.0.9".into(),
        services: vec![ServiceAd {
            name: "molt-provider".into(),
            port: 8443,
            protocol: "tcp".into(),
        }],
        gpus: Vec::new(),
    }));
    exchange(data, |io| {
        node_info::answer(io, info, crate::gpu::Shared::default(), Limits::PEERS)
    })
}

/// Raw bytes to the status API (first byte even) or to `metrics_listen` (odd).
pub fn api_http(data: &[u8]) {
    check_reply(&api_reply(data));
}

fn api_reply(data: &[u8]) -> Vec<u8> {
    let [which, request @ ..] = data else {
        return Vec::new();
    };
    let metrics_only = which % 2 == 1;
    let (_tx, status) = tokio::sync::watch::channel(StatusDoc::default());
    let sources = Sources::new(status, Live::default(), crate::gpu::Shared::default());
    let limits = if metrics_only {
        Limits::PEERS
    } else {
        Limits::LOCAL
    };
    exchange(request, |io| {
        crate::api::connection(io, sources, metrics_only, limits)
    })
}

/// Writes `request` to a server on an in-memory connection and returns everything the server
/// sent before it hung up. The client then waits without closing, as a slow or idle client
/// would (hyper drops a request whose client half-closes, so EOF would answer nothing).
fn exchange<F, Fut>(request: &[u8], serve: F) -> Vec<u8>
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let (mut reader, mut writer) = tokio::io::split(&mut client);
            let write = async {
                // The server may hang up before reading it all; that is its right.
                let _ = writer.write_all(request).await;
                writer
            };
            let read = async {
                let mut reply = Vec::new();
                let _ = reader.read_to_end(&mut reply).await;
                reply
            };
            let ((), _writer, reply) = tokio::join!(serve(server), write, read);
            reply
        })
    })
}

/// A server's reply, if any, is one HTTP/1 response and never a 500, which is what clawnode's
/// handlers answer when they fail. (hyper itself answers some requests 501 or 505.)
fn check_reply(reply: &[u8]) {
    if reply.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(reply);
    let status_line = text.lines().next().unwrap_or_default();
    let code: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {status_line:?}"));
    assert_ne!(code, 500, "server error: {status_line}");
    assert_eq!(
        text.matches("\r\n\r\nHTTP/1.").count(),
        0,
        "more than one response on one connection"
    );
}

/// Raw bytes as a peer's answer to `GET /v1/node` during `services discover`: hyper's
/// response parser, the size limit, the JSON and the name checks. What is accepted carries only
/// DNS labels; what is refused says why without a control character in it.
pub fn discover_answer(data: &[u8]) {
    match ask_peer(data) {
        Ok(info) => {
            assert!(
                info.name.parse::<config::NodeName>().is_ok(),
                "accepted a node name that is not a DNS label: {:?}",
                info.name
            );
            for name in info.services.iter().flat_map(|s| [&s.name, &s.protocol]) {
                assert!(
                    name.parse::<config::ServiceName>().is_ok(),
                    "accepted a name that is not a DNS label: {name:?}"
                );
            }
        }
        Err(error) => {
            let shown = discover::printable(&error);
            assert!(
                !shown.chars().any(char::is_control),
                "a control character reaches the terminal: {shown:?}"
            );
        }
    }
}

/// `GET /v1/node` to a peer that answers with `data`, and what discovery makes of it.
fn ask_peer(data: &[u8]) -> Result<NodeInfo, String> {
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let (client, mut peer) = tokio::io::duplex(64 * 1024);
            let (mut sender, conn) = match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
                TokioIo::new(client),
            )
            .await
            {
                Ok(pair) => pair,
                Err(error) => return Err(error.to_string()),
            };
            let ask = async move {
                let request = hyper::Request::get("/v1/node")
                    .header(hyper::header::HOST, "10.100.0.2")
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let resp = sender
                    .send_request(request)
                    .await
                    .map_err(|e| crate::http::source_chain(&e))?;
                discover::answer_of(resp).await
            };
            let answer = async {
                // The request is read (or not) and the fuzz input sent back as the answer.
                let mut head = [0u8; 1024];
                let _ = peer.read(&mut head).await;
                let _ = peer.write_all(data).await;
                let _ = peer.shutdown().await;
                // Hold the connection open until the client is done with it.
                let mut rest = Vec::new();
                let _ = peer.read_to_end(&mut rest).await;
            };
            let (_, (), result) = tokio::join!(conn, answer, ask);
            result
        })
    })
}

/// A request to the gateway's HTTPS endpoints from any caller on the network, before it has
/// authenticated: the parser refuses with a 4xx that says retrying cannot help, or yields a
/// request whose fields already hold their invariants (see `gateway::request::fuzz_request`).
pub fn gateway_request(data: &[u8]) {
    crate::gateway::request::fuzz_request(data);
}

/// A join token as pasted by an operator or read from `join_token_file`: accepted only in its
/// one canonical spelling (so it prints back as read), with URLs a client can dial; refused
/// with a printable message that never carries the secret. Session bearers likewise.
pub fn join_token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<JoinToken>() {
        Ok(token) => {
            assert_eq!(token.to_string(), text, "accepted a non-canonical token");
            // Debug does not depend on the secret at all.
            let mut other = token.clone();
            other.secret.0.iter_mut().for_each(|b| *b = !*b);
            assert_eq!(
                format!("{token:?}"),
                format!("{other:?}"),
                "the secret shows in Debug"
            );
            assert!(!token.urls.is_empty());
            for url in &token.urls {
                let (host, port) = coord::split_gateway_url(url).expect("an accepted URL splits");
                assert!(!host.is_empty() && port != 0, "{url}");
            }
        }
        Err(error) => check_refusal(text, &error.to_string(), 2),
    }
    match text.parse::<Session>() {
        Ok(session) => assert_eq!(session.bearer().as_str(), text, "a non-canonical bearer"),
        Err(error) => check_refusal(text, &error.to_string(), 1),
    }
}

/// A refusal is printable and never shows the secret: the third part of a token, the second
/// of a bearer. (A refused gateway URL is shown, so a secret that also appears in the URL list
/// may; that is the operator's own text, not the secret leaking.)
fn check_refusal(input: &str, message: &str, secret_part: usize) {
    assert!(
        !message.chars().any(char::is_control),
        "a control character in {message:?}"
    );
    let parts: Vec<&str> = input.split('.').collect();
    // Secret-shaped: 43 or more base64url characters (no message has such a run of its own).
    let shaped = |s: &&&str| {
        s.len() >= 43
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let Some(secret) = parts.get(secret_part).filter(shaped) else {
        return;
    };
    let urls = parts
        .get(4)
        .and_then(|u| coord::b64::url_decode(u))
        .map(|u| String::from_utf8_lossy(&u).into_owned())
        .unwrap_or_default();
    if !urls.contains(secret) {
        assert!(!message.contains(secret), "{message:?} shows the secret");
    }
}

thread_local! {
    /// The cluster the coordination targets verify against: the seeds are signed by it.
    static CLUSTER: (RootKey, SignerCert) = fuzz_cluster();
}

/// Root key from seed [1; 32], one signer (seed [2; 32]) that the root signed.
pub fn fuzz_cluster() -> (RootKey, SignerCert) {
    let root_pkcs8 = coord::ed25519_pkcs8_from_seed(&[1; 32]);
    let root = RootKey::from_pkcs8(&root_pkcs8).expect("a root key");
    let signer = coord::public_key_of_pkcs8(&coord::ed25519_pkcs8_from_seed(&[2; 32]))
        .expect("a signer key");
    let cert = coord::sign_signer(signer, "gw-fuzz", 1, u64::MAX, &root_pkcs8).expect("a cert");
    (root, cert)
}

/// One JSON body as a gateway sends it (an `Update`) or one of its parts (record, cert,
/// revocation, advert). Whatever parses writes back to the same value; what a `PeerSet`
/// accepts verifies against a root-signed signer, whatever the input claims.
pub fn coord_record(data: &[u8]) {
    fn round_trip<T>(data: &[u8])
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        if let Ok(value) = serde_json::from_slice::<T>(data) {
            let written = serde_json::to_vec(&value).expect("serializes");
            let again: T = serde_json::from_slice(&written).expect("what was written parses");
            assert_eq!(value, again, "changed through a write and a read");
        }
    }
    round_trip::<NodeRecord>(data);
    round_trip::<SignerCert>(data);
    round_trip::<Revocation>(data);
    round_trip::<Advert>(data);
    round_trip::<coord::JoinRequest>(data);
    round_trip::<coord::JoinResponse>(data);
    CLUSTER.with(|(root, cert)| {
        if let Ok(record) = serde_json::from_slice::<NodeRecord>(data) {
            let _ = record.verify(cert);
        }
        if let Ok(update) = serde_json::from_slice::<Update>(data) {
            round_trip::<Update>(data);
            let mut set = PeerSet::new(*root);
            let applied = set.apply(&update, 0);
            check_verified(&set, root, &update.signers);
            // The same update again changes nothing.
            let again = set.apply(&update, 0);
            assert!(
                !again.touched(),
                "a repeated update changed {again:?} after {applied:?}"
            );
        }
    });
}

/// Every record a set holds verifies against a signer cert that the root signed.
fn check_verified(set: &PeerSet, root: &RootKey, signers: &[SignerCert]) {
    for record in set.records() {
        let ok = signers
            .iter()
            .any(|c| c.verify(root).is_ok() && record.verify(c).is_ok());
        assert!(ok, "{} held without a valid signature", record.node_id);
        assert!(!set.is_revoked(record.node_id, record.serial));
    }
    for peer in set.peers(0, Grace::Live) {
        assert!(set.record(peer.node_id).is_some());
    }
}

/// The last-known-good cache file as read at start: any file loads to a set of verified
/// records (or is refused whole), and what it loads writes back to a file that loads the same.
pub fn peer_cache(data: &[u8]) {
    let Ok(cache) = serde_json::from_slice::<CacheFile>(data) else {
        return;
    };
    CLUSTER.with(|(root, _)| {
        let Ok((set, _rejected)) = PeerSet::from_cache(*root, &cache) else {
            return;
        };
        check_verified(&set, root, &cache.signers);
        let written = set.to_cache(cache.cursor, cache.saved_at);
        let text = serde_json::to_vec(&written).expect("serializes");
        let read: CacheFile = serde_json::from_slice(&text).expect("what was written parses");
        let (again, rejected) = PeerSet::from_cache(*root, &read).expect("its own file loads");
        assert!(
            rejected.is_empty(),
            "its own file has rejects: {rejected:?}"
        );
        assert_eq!(again, set, "the set changed through its own cache file");
    });
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz")
    }

    /// Runs `target` on every file of its corpus and regressions; each failure names its file.
    fn replay(name: &str) {
        let (_, target) = TARGETS
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a known target");
        let mut files = Vec::new();
        for dir in ["corpus", "regressions"] {
            let dir = fuzz_dir().join(dir).join(name);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        }
        files.sort();
        assert!(!files.is_empty(), "no saved inputs for {name}");
        let mut failed = Vec::new();
        for file in &files {
            let data = std::fs::read(file).expect("a readable corpus file");
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failed.push(file.display().to_string());
            }
        }
        assert!(failed.is_empty(), "{name} failed on {failed:#?}");
    }

    #[test]
    fn every_saved_config_file_is_read_without_a_crash() {
        replay("config");
    }

    #[test]
    fn every_saved_peer_drop_in_is_read_without_a_crash() {
        replay("peers_file");
    }

    #[test]
    fn every_saved_localapi_answer_is_read_without_a_crash() {
        replay("localapi");
    }

    #[test]
    fn every_saved_ipn_bus_stream_splits_the_same_in_any_chunks() {
        replay("ipn_bus");
    }

    #[test]
    fn every_saved_request_to_node_info_gets_at_most_one_answer_and_no_crash() {
        replay("node_info_http");
    }

    #[test]
    fn every_saved_request_to_the_status_api_gets_at_most_one_answer_and_no_crash() {
        replay("api_http");
    }

    #[test]
    fn every_saved_discover_answer_is_accepted_clean_or_refused_printably() {
        replay("discover_answer");
    }

    #[test]
    fn every_saved_join_token_is_canonical_or_refused_without_its_secret() {
        replay("join_token");
    }

    #[test]
    fn every_saved_gateway_body_round_trips_and_yields_only_verified_records() {
        replay("coord_record");
    }

    #[test]
    fn every_saved_peer_cache_loads_only_verified_records() {
        replay("peer_cache");
    }

    #[test]
    fn every_saved_gateway_request_is_refused_with_a_4xx_or_parsed_whole() {
        replay("gateway_request");
    }

    /// The coordination seeds are what the formats write today (Ed25519 is deterministic, so
    /// they are too), and they reach past the parsers: the signed ones verify and load.
    /// After a deliberate format change: `CLAWNODE_WRITE_SEEDS=1 cargo test --lib fuzzing::`.
    #[test]
    fn the_coordination_seeds_are_current_and_signed_by_the_fuzz_cluster() {
        let write = std::env::var_os("CLAWNODE_WRITE_SEEDS").is_some();
        for (target, name, data) in coordination_seeds() {
            let path = fuzz_dir()
                .join("corpus")
                .join(target)
                .join(format!("seed-{name}"));
            if write {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &data).unwrap();
            }
            let saved = std::fs::read(&path).unwrap_or_default();
            assert!(
                saved == data,
                "{} is stale: CLAWNODE_WRITE_SEEDS=1 cargo test --lib fuzzing::",
                path.display()
            );
        }
        let (root, cert) = fuzz_cluster();
        let read = |target: &str, name: &str| {
            std::fs::read(fuzz_dir().join("corpus").join(target).join(name)).expect(name)
        };
        let cache: CacheFile = serde_json::from_slice(&read("peer_cache", "seed-cache")).unwrap();
        let (set, rejected) = PeerSet::from_cache(root, &cache).unwrap();
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(set.peers(0, Grace::Live).len(), 2);
        let update: Update =
            serde_json::from_slice(&read("coord_record", "seed-snapshot")).unwrap();
        let mut set = PeerSet::new(root);
        let applied = set.apply(&update, 0);
        assert!(applied.rejected.is_empty(), "{applied:?}");
        assert_eq!(applied.added.len(), 2);
        let record: NodeRecord =
            serde_json::from_slice(&read("coord_record", "seed-record")).unwrap();
        record.verify(&cert).unwrap();
        let token = String::from_utf8(read("join_token", "seed-token")).unwrap();
        token.parse::<JoinToken>().unwrap();
    }

    /// The signed seeds (Python's seed.py cannot sign): (target, name, bytes).
    fn coordination_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        use crate::core::coord::*;
        use crate::core::peer_diff::PeerKey;
        let mut seeds = Vec::new();
        let mut write = |target: &'static str, name: &'static str, data: &[u8]| {
            seeds.push((target, name, data.to_vec()));
        };
        let (root, cert) = fuzz_cluster();
        let signer = ed25519_pkcs8_from_seed(&[2; 32]);
        let record = |id: u64, key: u8, address: &str, serial: u64| {
            sign_record(
                RecordFields {
                    node_id: NodeId(id),
                    name: format!("gpu-{id:02}"),
                    wg_key: PeerKey([key; 32]),
                    addresses: vec![address.parse().unwrap()],
                    roles: vec![Role::Node],
                    serial,
                    not_after: 4_000_000_000,
                    gateway_url: None,
                },
                &signer,
            )
            .unwrap()
        };
        let advert = Advert {
            node_id: NodeId(3),
            seq: 1,
            endpoints: vec!["198.51.100.3:51820".parse().unwrap()],
            services: vec![AdvertService {
                name: "molt-provider".into(),
                port: 8443,
            }],
            gpus: Some(GpuSummary {
                count: 8,
                model: "NVIDIA H200".into(),
                memory_mib: 143_771,
            }),
        };
        let revocation = sign_revocation(NodeId(5), 1, &signer).unwrap();
        let json = |v: &dyn erased::Json| v.json();
        let r3 = record(3, 0x33, "10.100.0.3", 1);
        write("coord_record", "record", &json(&r3));
        let gateway_record = sign_record(
            RecordFields {
                roles: vec![Role::Node, Role::Gateway],
                gateway_url: Some("https://gw-1.example:8443".into()),
                ..r3.fields()
            },
            &signer,
        )
        .unwrap();
        write("coord_record", "gateway-record", &json(&gateway_record));
        write("coord_record", "cert", &json(&cert));
        write("coord_record", "revocation", &json(&revocation));
        write("coord_record", "advert", &json(&advert));
        let cursor = Cursor {
            store_id: 0xab,
            rev: 7,
        };
        let snapshot = Update {
            cursor,
            kind: UpdateKind::Snapshot,
            signers: vec![cert.clone()],
            records: vec![r3.clone(), record(4, 0x44, "10.100.0.4", 1)],
            revocations: vec![revocation.clone()],
            adverts: vec![advert.clone()],
            gateways: vec!["https://203.0.113.1".into()],
        };
        write("coord_record", "snapshot", &json(&snapshot));
        let delta = Update {
            kind: UpdateKind::Delta,
            records: vec![
                record(3, 0x55, "10.100.0.3", 2),
                record(6, 0x33, "10.100.0.4", 1),
            ],
            revocations: vec![sign_revocation(NodeId(4), 1, &signer).unwrap()],
            adverts: vec![Advert {
                seq: 2,
                ..advert.clone()
            }],
            ..snapshot.clone()
        };
        write("coord_record", "delta", &json(&delta));
        write(
            "coord_record",
            "join-request",
            &json(&JoinRequest {
                token_id: TokenId([1; 8]),
                token_secret: Secret32([7; 32]),
                name: "gpu-07".into(),
                wg_key: PeerKey([0x77; 32]),
                endpoints: vec![],
                requested_address: None,
            }),
        );
        write(
            "coord_record",
            "join-response",
            &json(&JoinResponse {
                node_id: NodeId(3),
                session: Session {
                    node_id: NodeId(3),
                    secret: Secret32([9; 32]),
                },
                record: r3.clone(),
                mesh_cidr: "10.100.0.0/16".parse().unwrap(),
                gateways: vec!["https://203.0.113.1".into()],
            }),
        );
        let mut set = PeerSet::new(root);
        set.apply(&snapshot, 0);
        write(
            "peer_cache",
            "cache",
            &json(&set.to_cache(cursor, 1_800_000_000)),
        );
        let mut tampered = set.to_cache(cursor, 1_800_000_000);
        tampered.records[0].addresses = vec!["10.100.0.99".parse().unwrap()];
        write("peer_cache", "tampered", &json(&tampered));
        let token = JoinToken {
            id: TokenId([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]),
            secret: Secret32([7; 32]),
            root,
            urls: vec![
                "https://203.0.113.1:443".into(),
                "https://[2001:db8::1]:8443".into(),
            ],
        };
        write("join_token", "token", token.to_string().as_bytes());
        write(
            "join_token",
            "session",
            Session {
                node_id: NodeId(12),
                secret: Secret32([9; 32]),
            }
            .bearer()
            .as_bytes(),
        );
        write("join_token", "padded", format!("{token}=").as_bytes());
        seeds
    }

    mod erased {
        /// Pretty JSON of any serializable value, for the seed writer.
        pub trait Json {
            fn json(&self) -> Vec<u8>;
        }

        impl<T: serde::Serialize> Json for T {
            fn json(&self) -> Vec<u8> {
                serde_json::to_vec_pretty(self).expect("serializes")
            }
        }
    }

    /// The harnesses reach the code they claim to, so a target that passes means something.
    #[test]
    fn the_http_harnesses_get_real_answers() {
        let reply = node_info_reply(b"GET /v1/node HTTP/1.1\r\nHost: x\r\n\r\n");
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.contains(r#""name":"gpu-01""#), "{reply}");
        let reply = node_info_reply(b"POST /v1/node HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(reply.starts_with(b"HTTP/1.1 405"));
        let huge = format!(
            "GET /v1/node HTTP/1.1\r\nX-Fill: {}\r\n\r\n",
            "a".repeat(17_000)
        );
        let reply = node_info_reply(huge.as_bytes());
        assert!(reply.starts_with(b"HTTP/1.1 431"), "a head past the limit");
        // A client that stops mid-head is cut off at the header timeout (virtual time here).
        assert!(node_info_reply(b"GET /v1/node HTTP/1.1\r\nHost").is_empty());
        let reply = api_reply(b"\x00GET /v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(reply.starts_with(b"HTTP/1.1 200 OK"));
        assert!(reply.ends_with(b"live\n"));
        let reply = api_reply(b"\x01GET /v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            reply.starts_with(b"HTTP/1.1 404"),
            "only /metrics on metrics_listen"
        );
        let body = r#"{"name":"gpu-02","public_key":"k","address":"10.100.0.6","services":[{"name":"molt-provider","port":8443,"protocol":"tcp"}],"gpus":[]}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let info = ask_peer(answer.as_bytes()).expect("a good answer is accepted");
        assert_eq!(info.name, "gpu-02");
        assert_eq!(info.services[0].port, 8443);
        let refused = ask_peer(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(refused.unwrap_err(), "HTTP 404 Not Found");
    }

    #[test]
    fn every_target_has_a_cargo_fuzz_binary_and_a_corpus() {
        let manifest =
            std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("tests/fuzz/Cargo.toml");
        for (name, _) in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{name}\"")),
                "no [[bin]] for {name}"
            );
            let source = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
            let text = std::fs::read_to_string(&source).expect("the target's source");
            assert!(
                text.contains(&format!("clawnode::fuzzing::{name}(")),
                "{} does not call clawnode::fuzzing::{name}",
                source.display()
            );
            assert!(
                fuzz_dir().join("corpus").join(name).is_dir(),
                "no corpus for {name}"
            );
        }
    }
}
