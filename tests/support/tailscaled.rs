//! A stand-in tailscaled: the LocalAPI on a Unix socket, strict where the real one is strict
//! (see the LocalAPI fact sheet): 403 for a wrong Host or any Origin/Referer, an ETag that is
//! the SHA-256 of its JSON encoding of the serve config and 412 on mismatch, the three error
//! body formats, 204 for start and login-interactive, an NDJSON IPN bus with integer states
//! that a test can cut, `services` only from 1.98, and service approval through `CapMap` that
//! a test toggles (announced as `SelfChange` from 1.98). It also answers `check-prefs`,
//! `whois` (404 for strangers), `cert/<domain>` (only for `CertDomains`, key PEM first) and
//! can play a tailscaled locked by `--config`. Like tailscaled on Linux, its socket is 0666 and
//! only root and `OperatorUser` may write (any other peer gets 403 for anything but a GET).
//! Status and prefs start from real captures (tests/fixtures/tailscale).
//!
//! Prefs fields are version-gated like tailscaled's `ipn.Prefs` (see `GATED_PREFS`): a daemon
//! older than a field silently ignores it in a PATCH (Go's decoder skips unknown fields) and its
//! answer lacks it; a known field of the wrong JSON type gets Go's decode error as a 400. With
//! `RelayServerPort` set, the stand-in binds the UDP port like tailscaled's relay server.
#![allow(dead_code)]

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

const STATUS_FIXTURE: &str =
    include_str!("../fixtures/tailscale/status-scrubbed-linux-1.102.2.json");
const PREFS_FIXTURE: &str = include_str!("../fixtures/tailscale/prefs-partial.json");
/// 15 peers: 9 direct, 2 through a peer relay, 1 through DERP fra, 2 idle, 1 offline
/// (see its .source.txt for which entries are real and which constructed).
pub const MIXED_PATHS_FIXTURE: &str = include_str!("../fixtures/tailscale/status-mixed-paths.json");

type Body = BoxBody<Bytes, Infallible>;

/// A change another LocalAPI client makes to the serve config.
pub type ServeEdit = Box<dyn FnOnce(&mut Value) + Send>;

/// What the stand-in holds; tests read and change it through `StandIn::with`.
pub struct State {
    pub version: String,
    /// NoState, NeedsLogin, NeedsMachineAuth, Stopped, Starting, Running.
    pub backend_state: String,
    pub have_node_key: bool,
    pub prefs: Value,
    pub serve: Value,
    pub tags: Vec<String>,
    pub tailnet: String,
    pub suffix: String,
    pub ips: Vec<String>,
    /// Services control has approved this host for (Self.CapMap["service-host"]).
    pub approved: Vec<String>,
    /// The state a login ends in: "Running" or "NeedsMachineAuth".
    pub login_ends_in: String,
    /// Every call, as "METHOD /path".
    pub calls: Vec<String>,
    /// What each accepted write left advertised, in order: `prefs [AdvertiseServices...]`
    /// after a PATCH of prefs, `serve [Services names...]` after a serve-config POST. A test
    /// reads from it whether a service was ever advertised, however briefly.
    pub advertised_history: Vec<String>,
    pub auth_keys: Vec<String>,
    /// Called between a serve-config GET and the next POST, to play another writer.
    pub before_next_serve_post: Option<ServeEdit>,
    /// Other tailnet nodes `whois` knows: (IP, login name).
    pub peers: Vec<(String, String)>,
    /// HTTPS certificates enabled for the tailnet (CertDomains non-null).
    pub https: bool,
    /// Bumped per issuance, so a renewed cert differs from the last one.
    pub cert_serial: u32,
    /// Every `cert/` query string.
    pub cert_queries: Vec<String>,
    /// tailscaled started with --config: start, PATCH prefs and serve-config POST fail.
    pub config_locked: bool,
    /// One-shot: the next PATCH prefs runs this (a test looks at what clawnode has recorded
    /// by then), then fails with 500 and changes nothing.
    pub fail_next_prefs_patch: Option<Box<dyn FnOnce() + Send>>,
    /// `Peer` of `GET status` while Running (keyed by node key, `PeerStatus` values); the
    /// 1.102.2 capture's by default. A test swaps in another capture's, e.g. mixed paths.
    /// (`peers` above is whois's list.)
    pub peer_map: Value,
    /// Every PATCH prefs body, parsed (a non-JSON body as a JSON string), in order.
    pub prefs_patches: Vec<Value>,
    /// Why binding the relay port failed last time, while it stays failed (tailscaled logs
    /// "error initializing server" and tries again later).
    pub relay_bind_error: Option<String>,
    /// 1.84 to 1.89 start the relay server only when a peer first asks for an endpoint.
    relay_asked: bool,
    /// The relay port the last sync saw, to tell a changed port.
    relay_pref_seen: Option<u16>,
    /// (the port asked for, the socket bound for it)
    relay_socket: Option<(u16, std::net::UdpSocket)>,
    bus: broadcast::Sender<Value>,
}

/// Prefs fields tailscaled knows only from some version on (ipn/prefs.go at each tag):
/// `RelayServerPort` since v1.84.0 (`*int`, `*uint16` from v1.92.0),
/// `RelayServerStaticEndpoints` since v1.92.0.
pub const GATED_PREFS: &[(&str, (u32, u32))] = &[
    ("RelayServerPort", (1, 84)),
    ("RelayServerStaticEndpoints", (1, 92)),
];

impl State {
    fn fresh_prefs() -> Value {
        let mut prefs: Value = serde_json::from_str(PREFS_FIXTURE).expect("prefs fixture");
        prefs["AdvertiseServices"] = Value::Null;
        prefs["AdvertiseTags"] = Value::Null;
        prefs
    }

    fn fresh(version: &str) -> State {
        let prefs = State::fresh_prefs();
        let status: Value = serde_json::from_str(STATUS_FIXTURE).expect("status fixture");
        let (bus, _) = broadcast::channel(128);
        State {
            version: version.to_string(),
            backend_state: "NeedsLogin".into(),
            have_node_key: false,
            prefs,
            serve: Value::Null,
            tags: Vec::new(),
            tailnet: "example.com".into(),
            suffix: "tail1234.ts.net".into(),
            ips: vec!["100.101.102.103".into(), "fd7a:115c:a1e0::1".into()],
            approved: Vec::new(),
            login_ends_in: "Running".into(),
            calls: Vec::new(),
            advertised_history: Vec::new(),
            auth_keys: Vec::new(),
            before_next_serve_post: None,
            peers: Vec::new(),
            https: false,
            cert_serial: 0,
            cert_queries: Vec::new(),
            config_locked: false,
            fail_next_prefs_patch: None,
            peer_map: status["Peer"].clone(),
            prefs_patches: Vec::new(),
            relay_bind_error: None,
            relay_asked: false,
            relay_pref_seen: None,
            relay_socket: None,
            bus,
        }
    }

    /// Whether this daemon version has the prefs field `name` (fields not in `GATED_PREFS`
    /// are known to every version the stand-in plays).
    pub fn knows_pref(&self, name: &str) -> bool {
        GATED_PREFS
            .iter()
            .find(|(field, _)| *field == name)
            .is_none_or(|(_, (major, minor))| self.at_least(*major, *minor))
    }

    /// The UDP port the relay server holds now, if any.
    pub fn relay_bound_port(&self) -> Option<u16> {
        self.relay_socket
            .as_ref()
            .and_then(|(_, socket)| socket.local_addr().ok())
            .map(|addr| addr.port())
    }

    /// A peer asks this node for a relay endpoint: 1.84 to 1.89 start the relay server (bind
    /// the port) only then; from 1.90 it is bound as soon as the pref is set.
    pub fn peer_asks_for_relay_endpoint(&mut self) {
        self.relay_asked = true;
        self.sync_relay(true);
    }

    /// Start or stop the relay server to match the pref, as tailscaled's relayserver
    /// extension does on every prefs change; `up` is false while the daemon is down.
    fn sync_relay(&mut self, up: bool) {
        let wanted = self.prefs["RelayServerPort"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|_| up && self.knows_pref("RelayServerPort"));
        let lazy = !self.at_least(1, 90);
        let Some(port) = wanted else {
            self.relay_socket = None;
            self.relay_bind_error = None;
            // Before 1.90 a cleared pref tears the server down until the next peer request.
            if !up || lazy {
                self.relay_asked = false;
            }
            self.relay_pref_seen = None;
            return;
        };
        if self.relay_socket.as_ref().is_some_and(|(p, _)| *p == port) {
            return;
        }
        // A new port before 1.90: the old server is gone, the new one waits for a request.
        if lazy && self.relay_pref_seen.is_some_and(|seen| seen != port) {
            self.relay_asked = false;
        }
        self.relay_pref_seen = Some(port);
        self.relay_socket = None;
        if !self.at_least(1, 90) && !self.relay_asked {
            return;
        }
        // Like udprelay.NewServer: all interfaces, 0 for a port of the kernel's choice. A
        // socket just closed can linger for a moment in a child the test process forks (until
        // its exec), so a busy port is tried again briefly.
        let mut bound = std::net::UdpSocket::bind(("0.0.0.0", port));
        for _ in 0..100 {
            match &bound {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    bound = std::net::UdpSocket::bind(("0.0.0.0", port));
                }
                _ => break,
            }
        }
        match bound {
            Ok(socket) => {
                self.relay_socket = Some((port, socket));
                self.relay_bind_error = None;
            }
            Err(e) => self.relay_bind_error = Some(e.to_string()),
        }
    }

    pub fn serve_etag(&self) -> String {
        etag(&self.serve)
    }

    /// Control approves (or stops approving) this host for these services.
    pub fn set_approved(&mut self, services: &[&str]) {
        self.approved = services.iter().map(|s| s.to_string()).collect();
        if self.at_least(1, 98) {
            let me = self.status()["Self"].clone();
            let _ = self
                .bus
                .send(json!({ "Version": self.version, "SelfChange": me }));
        }
    }

    fn fqdn(&self) -> String {
        let hostname = self.prefs["Hostname"].as_str().unwrap_or("");
        format!("{hostname}.{}", self.suffix)
    }

    fn cert_domains(&self) -> Vec<String> {
        let mut domains = vec![self.fqdn()];
        for name in &self.approved {
            domains.push(format!(
                "{}.{}",
                name.trim_start_matches("svc:"),
                self.suffix
            ));
        }
        domains
    }

    /// Move to `state` and tell every bus watcher.
    pub fn set_state(&mut self, state: &str) {
        self.backend_state = state.to_string();
        let _ = self
            .bus
            .send(json!({ "Version": self.version, "State": state_number(state) }));
    }

    fn status(&self) -> Value {
        let mut status: Value = serde_json::from_str(STATUS_FIXTURE).expect("status fixture");
        status["Version"] = json!(self.version);
        status["BackendState"] = json!(self.backend_state);
        status["HaveNodeKey"] = json!(self.have_node_key);
        let running = self.backend_state == "Running";
        status["TailscaleIPs"] = if running {
            json!(self.ips)
        } else {
            Value::Null
        };
        let hostname = self.prefs["Hostname"].as_str().unwrap_or("").to_string();
        let me = &mut status["Self"];
        me["HostName"] = json!(hostname);
        me["DNSName"] = json!(format!("{hostname}.{}.", self.suffix));
        me["TailscaleIPs"] = json!(self.ips);
        me["Online"] = json!(running);
        if self.tags.is_empty() {
            me.as_object_mut().map(|m| m.remove("Tags"));
        } else {
            me["Tags"] = json!(self.tags);
        }
        let mapping: serde_json::Map<String, Value> = self
            .approved
            .iter()
            .map(|s| (s.clone(), json!(["100.100.1.1", "fd7a:115c:a1e0::100"])))
            .collect();
        if !mapping.is_empty() {
            me["CapMap"]["service-host"] = json!([mapping]);
        }
        if !self.at_least(1, 98) {
            // Before `GET services`, the details reach the node only as CapMap entries.
            for (i, name) in self.approved.iter().enumerate() {
                me["CapMap"][format!("services/{i}")] = json!([service_details(name)]);
            }
        }
        if self.https {
            status["Self"]["CapMap"]["https"] = Value::Null;
            status["CertDomains"] = json!(self.cert_domains());
        } else {
            status["CertDomains"] = Value::Null;
            if let Some(caps) = status["Self"]["CapMap"].as_object_mut() {
                caps.remove("https");
            }
        }
        status["Self"]["PublicKey"] =
            json!("nodekey:5c8f0a1ddc7f0e9e4d4f6e3a9ef1c8b1a7c0b5f4d3e2a1908f7e6d5c4b3a2910");
        status["CurrentTailnet"] = if running {
            json!({ "Name": self.tailnet, "MagicDNSSuffix": self.suffix, "MagicDNSEnabled": true })
        } else {
            Value::Null
        };
        // Without a netmap tailscaled adds no peers: `Peer` is null (the map is not omitempty).
        status["Peer"] = if running {
            self.peer_map.clone()
        } else {
            Value::Null
        };
        status
    }

    fn at_least(&self, major: u32, minor: u32) -> bool {
        let mut parts = self
            .version
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (a, b) >= (major, minor)
    }
}

fn service_details(name: &str) -> Value {
    json!({ "Name": name, "Addrs": ["100.100.1.1", "fd7a:115c:a1e0::100"], "Ports": ["tcp:8443"] })
}

/// What one of the node's state files held when the next PATCH of prefs arrived (that PATCH then
/// fails): tells whether clawnode recorded a change before making it.
#[derive(Clone, Default)]
pub struct FileAtFailedPatch {
    /// The node's directory, once the test knows it.
    pub dir: Arc<Mutex<Option<PathBuf>>>,
    seen: Arc<Mutex<Option<String>>>,
}

impl FileAtFailedPatch {
    /// Fail the next PATCH of prefs, reading `file` (relative to the node's directory) first.
    pub fn arm(&self, ts: &StandIn, file: &'static str) {
        let (dir, seen) = (Arc::clone(&self.dir), Arc::clone(&self.seen));
        ts.with(|s| {
            s.fail_next_prefs_patch = Some(Box::new(move || {
                let path = dir.lock().unwrap().as_ref().map(|d| d.join(file));
                *seen.lock().unwrap() = Some(
                    path.and_then(|f| std::fs::read_to_string(f).ok())
                        .unwrap_or_default(),
                );
            }))
        });
    }

    /// The file as it was, parsed; panics when no PATCH came.
    pub fn json(&self) -> Option<Value> {
        let text = self
            .seen
            .lock()
            .unwrap()
            .clone()
            .expect("the PATCH failed once");
        serde_json::from_str(&text).ok()
    }
}

pub fn etag(serve: &Value) -> String {
    let encoded = serde_json::to_vec(serve).expect("encode");
    let digest = Sha256::digest(&encoded);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn state_number(state: &str) -> u8 {
    match state {
        "InUseOtherUser" => 1,
        "NeedsLogin" => 2,
        "NeedsMachineAuth" => 3,
        "Stopped" => 4,
        "Starting" => 5,
        "Running" => 6,
        _ => 0,
    }
}

pub const PREFS_PATCH: &str = "PATCH /localapi/v0/prefs";
pub const SERVE_POST: &str = "POST /localapi/v0/serve-config";

pub struct StandIn {
    pub socket: PathBuf,
    pub state: Arc<Mutex<State>>,
    /// Its own runtime, so a test can use it from sync or async code alike.
    runtime: Option<tokio::runtime::Runtime>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl StandIn {
    /// Serve on `socket`, pretending to be tailscaled `version`.
    pub fn start(socket: &Path, version: &str) -> StandIn {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let mut standin = StandIn {
            socket: socket.to_path_buf(),
            state: Arc::new(Mutex::new(State::fresh(version))),
            runtime: Some(runtime),
            server: None,
        };
        standin.listen();
        standin
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Where `first` and `then` first appear in `calls`; panics naming the one missing.
    pub fn first_positions(calls: &[String], first: &str, then: &str) -> (usize, usize) {
        let at = |call: &str| {
            calls
                .iter()
                .position(|c| c == call)
                .unwrap_or_else(|| panic!("no {call}: {calls:?}"))
        };
        (at(first), at(then))
    }

    pub fn calls(&self) -> Vec<String> {
        self.with(|s| s.calls.clone())
    }

    /// Like tailscaled going away: the socket disappears, bus watchers are cut off and the
    /// relay port is released.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
        let (bus, _) = broadcast::channel(128);
        self.with(|s| {
            s.bus = bus;
            s.sync_relay(false);
        });
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Like tailscaled coming back after `stop`, with everything it had (prefs persist in its
    /// state file, so a set relay port is bound again).
    pub fn start_again(&mut self) {
        self.with(|s| s.sync_relay(true));
        self.listen();
    }

    /// Like a tailscaled restart whose state file was lost: prefs are back to the fresh
    /// capture's (no relay port), the login survives.
    pub fn restart_losing_prefs(&mut self) {
        self.stop();
        self.with(|s| s.prefs = State::fresh_prefs());
        self.start_again();
    }

    /// Like a tailscaled restart that lost its serve state (the login survives).
    pub fn restart_with_empty_serve_state(&mut self) {
        self.stop();
        self.with(|s| {
            s.serve = Value::Null;
            s.prefs["AdvertiseServices"] = Value::Null;
        });
        self.start_again();
    }

    fn listen(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let Some(runtime) = &self.runtime else {
            return;
        };
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(&self.socket).expect("bind stand-in socket")
        };
        // tailscaled's socket is world-writable: it checks the peer's credentials itself.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o666))
            .expect("chmod stand-in socket");
        let state = Arc::clone(&self.state);
        self.server = Some(runtime.spawn(async move {
            // Connections die with the server, as they do when tailscaled exits.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
                let state = Arc::clone(&state);
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(req, state, uid).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn handle(req: Request<Incoming>, state: Arc<Mutex<State>>, uid: u32) -> Response<Body> {
    let version = state.lock().unwrap().version.clone();
    let mut response = if req.method() != Method::GET && !may_write(&state, uid) {
        state
            .lock()
            .unwrap()
            .calls
            .push(format!("{} {} (denied)", req.method(), req.uri().path()));
        text(StatusCode::FORBIDDEN, "access denied")
    } else {
        route(req, &state).await
    };
    response
        .headers_mut()
        .insert("Tailscale-Version", version.parse().unwrap());
    response
        .headers_mut()
        .insert("Tailscale-Cap", "145".parse().unwrap());
    response
}

/// tailscaled on Linux: root, or the user named in the `OperatorUser` pref.
fn may_write(state: &Arc<Mutex<State>>, uid: u32) -> bool {
    if uid == 0 {
        return true;
    }
    let operator = state.lock().unwrap().prefs["OperatorUser"]
        .as_str()
        .unwrap_or("")
        .to_string();
    !operator.is_empty()
        && nix::unistd::User::from_name(&operator)
            .ok()
            .flatten()
            .is_some_and(|u| u.uid.as_raw() == uid)
}

const LOCKED: &str = "can't reconfigure tailscaled when using a config file; config file is locked";

async fn route(req: Request<Incoming>, state: &Arc<Mutex<State>>) -> Response<Body> {
    // Go's server answers 400 to an HTTP/1.1 request without Host before any handler runs.
    let Some(host) = req.headers().get("Host") else {
        return text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: missing required Host header",
        );
    };
    let host_ok = host.as_bytes() == b"local-tailscaled.sock" || host.is_empty();
    let browser = req.headers().contains_key("Origin") || req.headers().contains_key("Referer");
    if !host_ok || browser {
        return text(StatusCode::FORBIDDEN, "invalid localapi request");
    }
    if let Some(reason) = req.headers().get("X-Tailscale-Reason")
        && base64::engine::general_purpose::STANDARD
            .decode(reason.as_bytes())
            .is_err()
    {
        return text(StatusCode::BAD_REQUEST, "invalid reason header");
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let if_match = req
        .headers()
        .get("If-Match")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state.lock().unwrap().calls.push(format!("{method} {path}"));
    if path == "/localapi/v0/watch-ipn-bus" {
        return watch(&query, state);
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut s = state.lock().unwrap();
    if method == Method::PATCH && path == "/localapi/v0/prefs" {
        let recorded = serde_json::from_slice::<Value>(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        s.prefs_patches.push(recorded);
    }
    match (method, path.as_str()) {
        (Method::GET, "/localapi/v0/status") => {
            let mut status = s.status();
            // ?peers=false: StatusWithoutPeers, whose Peer stays nil (JSON null).
            if query.split('&').any(|kv| {
                kv.strip_prefix("peers=")
                    .is_some_and(|v| matches!(v, "false" | "0" | "f" | "F" | "FALSE" | "False"))
            }) {
                status["Peer"] = Value::Null;
            }
            json_response(StatusCode::OK, &status)
        }
        (Method::GET, "/localapi/v0/prefs") => json_response(StatusCode::OK, &s.prefs),
        (Method::PATCH, "/localapi/v0/prefs") if s.config_locked => {
            json_response(StatusCode::BAD_REQUEST, &json!({ "Error": LOCKED }))
        }
        (Method::POST, "/localapi/v0/start") if s.config_locked => {
            text(StatusCode::INTERNAL_SERVER_ERROR, LOCKED)
        }
        (Method::POST, "/localapi/v0/serve-config") if s.config_locked => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": format!("updating config: {LOCKED}") }),
        ),
        (Method::PATCH, "/localapi/v0/prefs") if s.fail_next_prefs_patch.is_some() => {
            if let Some(look) = s.fail_next_prefs_patch.take() {
                look();
            }
            json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({ "error": "injected failure: prefs not saved" }),
            )
        }
        (Method::POST, "/localapi/v0/check-prefs") => {
            let Ok(prefs) = serde_json::from_slice::<Value>(&body) else {
                return text(StatusCode::BAD_REQUEST, "invalid JSON body");
            };
            let hostname = prefs["Hostname"].as_str().unwrap_or("");
            let verdict = if hostname.contains('_') || hostname.len() > 63 {
                json!({ "Error": format!("invalid hostname {hostname:?}") })
            } else {
                json!({})
            };
            json_response(StatusCode::OK, &verdict)
        }
        (Method::GET, "/localapi/v0/whois") => {
            let Some(addr) = query.split('&').find_map(|kv| kv.strip_prefix("addr=")) else {
                return text(StatusCode::BAD_REQUEST, "missing 'addr' parameter");
            };
            let ip = addr
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|_| addr.to_string());
            if ip.parse::<std::net::IpAddr>().is_err() {
                return text(StatusCode::BAD_REQUEST, "invalid 'addr' parameter");
            }
            let login = if s.ips.contains(&ip) {
                Some(s.fqdn())
            } else {
                s.peers
                    .iter()
                    .find(|(p, _)| *p == ip)
                    .map(|(_, l)| l.clone())
            };
            match login {
                Some(login) => json_response(
                    StatusCode::OK,
                    &json!({
                        "Node": { "ID": 7, "StableID": "nSTANDIN", "Name": format!("{login}."), "Addresses": [format!("{ip}/32")] },
                        "UserProfile": { "ID": 7, "LoginName": login, "DisplayName": login.split('.').next().unwrap_or("") },
                        "CapMap": null
                    }),
                ),
                None => text(StatusCode::NOT_FOUND, "no match for IP:port"),
            }
        }
        (Method::GET, p) if p.starts_with("/localapi/v0/cert/") => {
            let domain = p
                .trim_start_matches("/localapi/v0/cert/")
                .trim_end_matches('.')
                .to_string();
            s.cert_queries.push(query.clone());
            let kind = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("type="))
                .unwrap_or("");
            if !matches!(kind, "" | "cert" | "crt" | "key" | "pair") {
                return text(StatusCode::BAD_REQUEST, "invalid type");
            }
            if !s.https {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "your Tailscale account does not support getting TLS certs",
                );
            }
            let domains = s.cert_domains();
            if !domains.contains(&domain) {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("invalid domain {domain:?}; must be one of {domains:?}"),
                );
            }
            let serial = s.cert_serial;
            let key = format!(
                "-----BEGIN EC PRIVATE KEY-----\nKEY{serial}{domain}\n-----END EC PRIVATE KEY-----\n"
            );
            let chain = format!(
                "-----BEGIN CERTIFICATE-----\nLEAF{serial}{domain}\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nINTERMEDIATE\n-----END CERTIFICATE-----\n"
            );
            let body = match kind {
                "key" => key,
                "pair" => format!("{key}{chain}"),
                _ => chain,
            };
            text_raw(StatusCode::OK, body)
        }
        (Method::PATCH, "/localapi/v0/prefs") => {
            let Ok(Value::Object(masked)) = serde_json::from_slice::<Value>(&body) else {
                return text(StatusCode::BAD_REQUEST, "invalid JSON body");
            };
            if let Some(Value::String(h)) = masked.get("Hostname")
                && masked.get("HostnameSet") == Some(&json!(true))
                && (h.is_empty() || h.contains('_') || h.len() > 63)
            {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({ "Error": format!("invalid hostname {h:?}") }),
                );
            }
            if let Some(message) = relay_port_decode_error(&s, &masked) {
                return text(StatusCode::BAD_REQUEST, &message);
            }
            for (key, value) in &masked {
                // Go's decoder skips fields the daemon's Prefs does not have.
                if key.ends_with("Set") || !s.knows_pref(key) {
                    continue;
                }
                if masked.get(&format!("{key}Set")) == Some(&json!(true)) {
                    if value.is_null() && GATED_PREFS.iter().any(|(f, _)| f == key) {
                        // nil pointer / empty slice, omitempty: gone from the prefs JSON.
                        s.prefs.as_object_mut().map(|m| m.remove(key));
                    } else {
                        s.prefs[key] = value.clone();
                    }
                }
            }
            // A gated field whose …Set is true but that the body leaves out is set to nil.
            for (field, _) in GATED_PREFS {
                if !masked.contains_key(*field)
                    && masked.get(&format!("{field}Set")) == Some(&json!(true))
                    && s.knows_pref(field)
                {
                    s.prefs.as_object_mut().map(|m| m.remove(*field));
                }
            }
            s.sync_relay(true);
            let now = format!("prefs {}", s.prefs["AdvertiseServices"]);
            s.advertised_history.push(now);
            json_response(StatusCode::OK, &s.prefs)
        }
        (Method::POST, "/localapi/v0/start") => {
            let Ok(options) = serde_json::from_slice::<Value>(&body) else {
                return text(StatusCode::BAD_REQUEST, "invalid JSON body");
            };
            if let Some(prefs) = options.get("UpdatePrefs").filter(|p| p.is_object()) {
                s.prefs = prefs.clone();
                let now = format!("prefs {}", s.prefs["AdvertiseServices"]);
                s.advertised_history.push(now);
                // Control accepts the requested tags (the auth key allows them, in this play).
                s.tags = prefs["AdvertiseTags"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
            }
            if let Some(key) = options
                .get("AuthKey")
                .and_then(Value::as_str)
                .filter(|k| !k.is_empty())
            {
                s.auth_keys.push(key.to_string());
            }
            s.set_state("Starting");
            if s.have_node_key {
                let end = s.login_ends_in.clone();
                s.set_state(&end);
            }
            empty(StatusCode::NO_CONTENT)
        }
        (Method::POST, "/localapi/v0/login-interactive") => {
            s.have_node_key = true;
            let end = s.login_ends_in.clone();
            s.set_state(&end);
            empty(StatusCode::NO_CONTENT)
        }
        (Method::GET, "/localapi/v0/serve-config") => {
            let etag = s.serve_etag();
            let mut response = json_response(StatusCode::OK, &s.serve);
            response.headers_mut().insert("Etag", etag.parse().unwrap());
            response
        }
        (Method::POST, "/localapi/v0/serve-config") => {
            if let Some(change) = s.before_next_serve_post.take() {
                change(&mut s.serve);
            }
            if let Some(tag) = if_match.filter(|t| !t.is_empty())
                && tag != s.serve_etag()
            {
                return text(StatusCode::PRECONDITION_FAILED, "etag mismatch");
            }
            match serde_json::from_slice::<Value>(&body) {
                Ok(config) => {
                    s.serve = config;
                    let names: Vec<&String> = s.serve["Services"]
                        .as_object()
                        .map(|m| m.keys().collect())
                        .unwrap_or_default();
                    let now = format!("serve {}", json!(names));
                    s.advertised_history.push(now);
                    empty(StatusCode::OK)
                }
                Err(e) => json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({ "error": format!("decoding config: {e}") }),
                ),
            }
        }
        (Method::GET, "/localapi/v0/services") if s.at_least(1, 98) => {
            let services: serde_json::Map<String, Value> = s
                .approved
                .iter()
                .map(|name| (name.clone(), service_details(name)))
                .collect();
            json_response(StatusCode::OK, &Value::Object(services))
        }
        _ => text(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// Go's `json: cannot unmarshal …` for a `RelayServerPort` the daemon's type cannot hold:
/// `*int` before 1.92 (any integer fits), `*uint16` from 1.92. None when it decodes, or when
/// the daemon does not know the field (then it is skipped whatever its type).
fn relay_port_decode_error(s: &State, masked: &serde_json::Map<String, Value>) -> Option<String> {
    // Every `…Set` mask but the nested AutoUpdateSet is a Go bool.
    for (key, value) in masked {
        let Some(field) = key.strip_suffix("Set") else {
            continue;
        };
        let known = !GATED_PREFS.iter().any(|(f, _)| *f == field) || s.knows_pref(field);
        let what = match value {
            Value::Bool(_) | Value::Null => continue,
            Value::Number(n) => format!("number {n}"),
            Value::String(_) => "string".into(),
            Value::Array(_) => "array".into(),
            Value::Object(_) => "object".into(),
        };
        if known && key != "AutoUpdateSet" {
            return Some(format!(
                "json: cannot unmarshal {what} into Go struct field MaskedPrefs.{key} of type bool"
            ));
        }
    }
    let value = masked.get("RelayServerPort")?;
    if !s.knows_pref("RelayServerPort") {
        return None;
    }
    let uint16 = s.at_least(1, 92);
    let fits = match value {
        Value::Null => return None,
        Value::Number(n) if uint16 => n.as_u64().is_some_and(|p| p <= u64::from(u16::MAX)),
        Value::Number(n) => n.as_i64().is_some(),
        Value::String(_) | Value::Bool(_) | Value::Array(_) | Value::Object(_) => false,
    };
    if fits {
        return None;
    }
    let what = match value {
        Value::Number(n) => format!("number {n}"),
        Value::String(_) => "string".into(),
        Value::Bool(_) => "bool".into(),
        Value::Array(_) => "array".into(),
        Value::Object(_) | Value::Null => "object".into(),
    };
    let ty = if uint16 { "uint16" } else { "int" };
    Some(format!(
        "json: cannot unmarshal {what} into Go struct field MaskedPrefs.RelayServerPort of type {ty}"
    ))
}

fn watch(query: &str, state: &Arc<Mutex<State>>) -> Response<Body> {
    let mask: u64 = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("mask="))
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let (first, mut rx) = {
        let s = state.lock().unwrap();
        let first = (mask & 2 != 0).then(|| {
            json!({ "Version": s.version, "SessionID": "standin", "State": state_number(&s.backend_state) })
        });
        (first, s.bus.subscribe())
    };
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    tokio::spawn(async move {
        if let Some(first) = first {
            let _ = tx.send(Ok(Frame::data(line(&first)))).await;
        }
        while let Ok(notify) = rx.recv().await {
            if tx.send(Ok(Frame::data(line(&notify)))).await.is_err() {
                break;
            }
        }
    });
    let stream = tokio_stream_from(body_rx);
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response
        .headers_mut()
        .insert("Content-Type", "application/json".parse().unwrap());
    response
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn line(value: &Value) -> Bytes {
    let mut out = serde_json::to_vec(value).unwrap();
    out.push(b'\n');
    Bytes::from(out)
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response =
        Response::new(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())).boxed());
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert("Content-Type", "application/json".parse().unwrap());
    response
}

fn text(code: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))).boxed());
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert("Content-Type", "text/plain; charset=utf-8".parse().unwrap());
    response
}

fn text_raw(code: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert("Content-Type", "text/plain; charset=utf-8".parse().unwrap());
    response
}

fn empty(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = code;
    response
}
