//! The node's side of gateway coordination: join with a token, keep a verified last-known-good
//! peer set in `state_dir`, and follow the gateways with a long poll and a cursor.
//!
//! Start-up order: a session on disk? Load and re-verify the cache, and apply its peers before
//! any gateway is contacted. No session: read the token, check the gateway against the root
//! key the token pins (see `tls`), join, and keep the session (0600). Then one task per node
//! polls `GET /v1/peers` with the cursor, applies each answer through `core::coord::PeerSet`,
//! writes the cache atomically and asks the mesh to reconcile. With every gateway down the
//! node keeps its peers, runs on the cache and retries with full-jitter backoff.
//!
//! Gateways are learned from each answer's list, the signed peer set (gateway records carry
//! their URL) and the bootstrap URLs of the session, and kept in the cache with the one that
//! answered last, so a node restarted while that gateway is down tries the others. Failing
//! over keeps the cursor: any gateway of the cluster resumes it.

pub mod client;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{Config, JoinTokenSource};
use crate::core::coord::{
    Advert, AdvertService, CacheFile, Cursor, GpuSummary, Grace, JoinRequest, JoinToken, NodeId,
    PeerSet, Reject, RootKey, ServiceInstance, Session, Update, UpdateKind,
};
use crate::core::peer_diff::PeerKey;
use crate::core::{Failure, Retry};
use crate::mesh::Recheck;
use crate::mesh::live::GatewayDoc;

use crate::core::coord::client::{
    AdvertContent, Adverts, GwPeer, Rotation, gateways_after_answer, known_gateways, retry_delay,
};
pub use client::{Answer, CallError, GatewayClient, Raw};

/// How long a node without a cache waits for its first peer set before it reports ready.
pub const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(3);

/// How long a long poll asks the gateway to wait for a change.
pub const POLL_WAIT: Duration = Duration::from_secs(25);

/// `<state_dir>/gateway-session.json`: what a node keeps after joining (0600; the session is a
/// credential). The token is never needed again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFile {
    pub root: RootKey,
    pub node_id: NodeId,
    pub session: Session,
    pub address: IpAddr,
    pub mesh_cidr: IpNet,
    pub gateways: Vec<String>,
    /// Informational: the cursor that goes with the cache is the cache's own.
    #[serde(default)]
    pub cursor: Option<Cursor>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn session_path(state_dir: &Path) -> PathBuf {
    state_dir.join(crate::state::GATEWAY_SESSION)
}

pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join(crate::state::PEERSET_CACHE)
}

/// The session kept in `state_dir`, if the node has joined. A file that cannot be read is an
/// operator's problem: joining again would make a second node.
pub fn load_session(state_dir: &Path) -> Result<Option<SessionFile>, Failure> {
    let path = session_path(state_dir);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Failure::transient(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    serde_json::from_slice(&text).map(Some).map_err(|e| {
        Failure::needs_operator(format!(
            "gateway session {} is unreadable ({e}); remove it and give the node a new join token",
            path.display()
        ))
    })
}

fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Failure> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| Failure::transient(format!("encode {}: {e}", path.display())))?;
    crate::state::write_atomic(path, &bytes, 0o600).map_err(|e| Failure::transient(e.to_string()))
}

/// The cache verified against `root`: every signature checked again, a file of another
/// cluster refused whole. `Err` says why nothing of it is used.
pub fn load_cache(
    path: &Path,
    root: RootKey,
) -> Result<Option<(PeerSet, CacheFile, Vec<String>)>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let cache: CacheFile = serde_json::from_slice(&bytes)
        .map_err(|e| format!("peer cache {} is not valid: {e}", path.display()))?;
    let (set, rejected) = PeerSet::from_cache(root, &cache)
        .map_err(|e| format!("peer cache {} refused: {e}", path.display()))?;
    let rejected = rejected
        .iter()
        .map(|r| format!("peer cache {}: left out: {r}", path.display()))
        .collect();
    Ok(Some((set, cache, rejected)))
}

/// Where the node stands with its gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No answer yet, and no cache.
    Joining,
    /// The last poll was answered.
    Live,
    /// No gateway answers; the peers come from the verified cache.
    Cached,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Joining => "joining",
            Mode::Live => "live",
            Mode::Cached => "cached",
        }
    }
}

/// The state the poll task keeps and the mesh, status and metrics read.
pub struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the poll task when this node's advert content changed.
    advert_changed: tokio::sync::Notify,
}

struct Inner {
    set: PeerSet,
    own: NodeId,
    mode: Mode,
    /// Live: since the first answer of this streak. Cached: the last good answer (or the
    /// cache's `saved_at`), which is also where the offline grace counts from.
    since: u64,
    cursor: Option<Cursor>,
    /// When a gateway last answered (unix seconds).
    answered_at: Option<u64>,
    url: Option<String>,
    snapshots: u64,
    deltas: u64,
    grace_s: u64,
    /// What went wrong last (a refused cache, a gateway error), for status.
    problems: Vec<String>,
    services: Vec<(String, u16)>,
    gpus: Option<(u32, String, u64)>,
    /// The gateways known (the rotation's list) and the one polled now.
    gateways: Vec<String>,
    current: Option<String>,
    /// The session's URLs (config or token): always known.
    bootstrap: Vec<String>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn grace(inner: &Inner) -> Grace {
        match inner.mode {
            Mode::Live => Grace::Live,
            Mode::Joining | Mode::Cached => Grace::Offline {
                since: inner.since,
                grace: inner.grace_s,
            },
        }
    }

    /// The peers to configure at `now`, without this node itself.
    pub fn peers(&self, now: u64) -> Vec<GwPeer> {
        let inner = self.lock();
        inner
            .set
            .peers(now, Self::grace(&inner))
            .into_iter()
            .filter(|p| p.node_id != inner.own)
            .map(|p| GwPeer {
                name: p.name,
                key: p.key,
                addresses: p.addresses,
                endpoint: p.endpoint,
            })
            .collect()
    }

    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    /// The gateway part of STATUS=.
    pub fn status_note(&self) -> String {
        let inner = self.lock();
        match inner.mode {
            Mode::Live => "gateway peers live".to_string(),
            Mode::Joining => "waiting for the gateway's peer set".to_string(),
            Mode::Cached => format!(
                "on cached peer set since {} (gateway unreachable)",
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(inner.since))
            ),
        }
    }

    pub fn problems(&self) -> Vec<String> {
        self.lock().problems.clone()
    }

    /// For `status --json` and `/metrics`.
    pub fn doc(&self, now: u64) -> GatewayDoc {
        let inner = self.lock();
        GatewayDoc {
            url: inner.url.clone(),
            state: inner.mode.as_str().to_string(),
            cursor: inner.cursor.map(|c| c.to_string()),
            cursor_age_s: inner.answered_at.map(|at| now.saturating_sub(at)),
            since: inner.since,
            peers: inner
                .set
                .peers(now, Self::grace(&inner))
                .iter()
                .filter(|p| p.node_id != inner.own)
                .count(),
            snapshots: inner.snapshots,
            deltas: inner.deltas,
            gateways: inner.gateways.clone(),
            current: inner.current.clone(),
        }
    }

    /// The services this node publishes; an advert goes out if they changed.
    pub fn set_services(&self, services: Vec<(String, u16)>) {
        let mut inner = self.lock();
        if inner.services != services {
            inner.services = services;
            drop(inner);
            self.advert_changed.notify_one();
        }
    }

    /// The GPU inventory's summary; an advert goes out if it changed.
    pub fn set_gpus(&self, gpus: Option<(u32, String, u64)>) {
        let mut inner = self.lock();
        if inner.gpus != gpus {
            inner.gpus = gpus;
            drop(inner);
            self.advert_changed.notify_one();
        }
    }
}

/// The running coordination of one node: its session, its shared state and its poll task
/// (stopped when this is dropped).
pub struct Coordinator {
    pub session: SessionFile,
    pub shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a node needs to join and advertise.
pub struct NodeIdentity {
    pub name: String,
    pub wg_key: PeerKey,
    pub listen_port: u16,
    pub interface: String,
}

impl Coordinator {
    /// Start coordination if the node has joined before or has a join token; `None` without
    /// either (hand-written peers only).
    pub async fn start(
        config: &Config,
        me: &NodeIdentity,
        recheck: Recheck,
        gpus: GpuWatch,
    ) -> Result<Option<Coordinator>, Failure> {
        let wg = &config.network.wireguard;
        let state_dir = &config.node.state_dir;
        let session = match load_session(state_dir)? {
            Some(session) => session,
            None => {
                let Some(source) = &wg.join_token else {
                    return Ok(None);
                };
                let token = read_token(source)?;
                let session = join(&token, me, wg.mesh_cidr).await?;
                crate::state::ensure_private_dir(state_dir)
                    .map_err(|e| Failure::transient(e.to_string()))?;
                save_json(&session_path(state_dir), &session)?;
                tracing::info!(component = "gateway-client", node_id = %session.node_id, address = %session.address, "joined the cluster; session kept in the state directory");
                session
            }
        };
        let coordinator = Self::run(
            session,
            cache_path(state_dir),
            wg.gateway_offline_grace.as_secs(),
            me,
            recheck,
            gpus,
        )
        .await;
        // Without a cache there is nothing to apply yet: wait a moment for the first answer,
        // so that READY means the peers are configured. A gateway that does not answer in
        // time leaves the node ready without them (STATUS says it waits for them).
        let deadline = tokio::time::Instant::now() + FIRST_ANSWER_WAIT;
        while coordinator.shared.mode() == Mode::Joining && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Some(coordinator))
    }

    /// Load the cache and start the poll task for `session`.
    pub async fn run(
        session: SessionFile,
        cache: PathBuf,
        grace_s: u64,
        me: &NodeIdentity,
        recheck: Recheck,
        gpus: GpuWatch,
    ) -> Coordinator {
        let now = unix_now();
        let mut problems = Vec::new();
        // Re-verifying every signature of a large cache is seconds of CPU: not on the runtime.
        let loaded = {
            let (path, root) = (cache.clone(), session.root);
            tokio::task::spawn_blocking(move || load_cache(&path, root))
                .await
                .unwrap_or_else(|e| Err(format!("loading the peer cache failed: {e}")))
        };
        let mut cached_gateways = (Vec::new(), None);
        let (set, cursor, mode, since) = match loaded {
            Ok(Some((set, file, rejected))) => {
                for problem in &rejected {
                    tracing::warn!(component = "gateway-client", %problem, "peer cache");
                }
                tracing::info!(
                    component = "gateway-client",
                    saved_at = file.saved_at,
                    "applying the cached peer set before contacting a gateway"
                );
                // With items left out the set no longer matches its cursor: the gateway would
                // answer "nothing changed", so ask for a snapshot instead.
                let cursor = rejected.is_empty().then_some(file.cursor);
                problems.extend(rejected);
                cached_gateways = (file.gateways, file.gateway);
                (set, cursor, Mode::Cached, file.saved_at)
            }
            Ok(None) => (PeerSet::new(session.root), None, Mode::Joining, now),
            Err(problem) => {
                tracing::error!(component = "gateway-client", %problem, "peer cache rejected; starting without it");
                problems.push(problem);
                (PeerSet::new(session.root), None, Mode::Joining, now)
            }
        };
        // Offline start: the gateways of the cache (incl. the one that answered last), those
        // the cached set signs for, then the session's.
        let signed = set.gateway_urls(
            now,
            Grace::Offline {
                since,
                grace: grace_s,
            },
        );
        let (cached, last_good) = cached_gateways;
        let rotation = Rotation::new(
            known_gateways([&cached[..], &signed, &session.gateways]),
            last_good,
            fastrand::u64(..),
        );
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                set,
                own: session.node_id,
                mode,
                since,
                cursor,
                answered_at: None,
                url: None,
                snapshots: 0,
                deltas: 0,
                grace_s,
                problems,
                services: Vec::new(),
                gpus: gpus.borrow().clone(),
                gateways: rotation.urls().to_vec(),
                current: rotation.current().map(str::to_owned),
                bootstrap: session.gateways.clone(),
            }),
            advert_changed: tokio::sync::Notify::new(),
        });
        let mut client = GatewayClient::new(session.root.0);
        client.set_session(session.session.bearer().as_str());
        let poller = Poller {
            client,
            rotation,
            adverts: Adverts::default(),
            shared: Arc::clone(&shared),
            cache,
            recheck,
            source: AdvertSource {
                shared: Arc::clone(&shared),
                node_id: session.node_id,
                listen_port: me.listen_port,
                interface: me.interface.clone(),
                mesh_cidr: session.mesh_cidr,
            },
            gpus,
        };
        let task = tokio::spawn(poller.run());
        Coordinator {
            session,
            shared,
            task,
        }
    }

    /// The node's mesh address with the mesh's prefix.
    pub fn address(&self) -> IpNet {
        IpNet::new(self.session.address, self.session.mesh_cidr.prefix_len())
            .unwrap_or_else(|_| IpNet::from(self.session.address))
    }
}

fn read_token(source: &JoinTokenSource) -> Result<JoinToken, Failure> {
    let (text, from) = match source {
        JoinTokenSource::File(path) => (
            std::fs::read_to_string(path).map_err(|e| {
                Failure::needs_operator(format!(
                    "cannot read join_token_file {}: {e}",
                    path.display()
                ))
            })?,
            format!("join_token_file {}", path.display()),
        ),
        JoinTokenSource::Env(var) => (
            std::env::var(var).map_err(|_| {
                Failure::needs_operator(format!(
                    "join_token_env: environment variable {var} is not set"
                ))
            })?,
            format!("join_token_env {var}"),
        ),
    };
    let text = zeroize::Zeroizing::new(text);
    text.trim()
        .parse::<JoinToken>()
        .map_err(|e| Failure::needs_operator(format!("{from}: not a join token: {e}")))
}

/// Join at the token's gateways in turn; a refusal that retrying cannot help (token used,
/// expired, unknown) stops at once.
async fn join(
    token: &JoinToken,
    me: &NodeIdentity,
    mesh_cidr: IpNet,
) -> Result<SessionFile, Failure> {
    let mut client = GatewayClient::new(token.root.0);
    let request = JoinRequest {
        token_id: token.id,
        token_secret: token.secret.clone(),
        name: me.name.clone(),
        wg_key: me.wg_key,
        endpoints: host_endpoints(me.listen_port, mesh_cidr, &me.interface),
        requested_address: None,
    };
    let mut last = None;
    for url in &token.urls {
        match client.join(url, &request).await {
            Ok(answer) => {
                let joined = answer.body;
                // The token's URLs stay known beside the gateways alive now: one of those it
                // names may be down only for the moment.
                let answered = [url.clone()];
                let gateways = known_gateways([&answered[..], &joined.gateways, &token.urls]);
                let address = joined
                    .record
                    .addresses
                    .iter()
                    .copied()
                    .find(|a| joined.mesh_cidr.contains(a))
                    .ok_or_else(|| {
                        Failure::transient(format!(
                            "gateway {url} assigned no address inside {}",
                            joined.mesh_cidr
                        ))
                    })?;
                return Ok(SessionFile {
                    root: token.root,
                    node_id: joined.node_id,
                    session: joined.session,
                    address,
                    mesh_cidr: joined.mesh_cidr,
                    gateways,
                    cursor: None,
                });
            }
            Err(error) if error.retry == Retry::NeedsOperator => {
                return Err(Failure::needs_operator(format!(
                    "join refused: {}",
                    error.message
                )));
            }
            Err(error) => {
                tracing::warn!(component = "gateway-client", gateway = %url, error = %error.message, "join failed; trying the next gateway");
                last = Some(error);
            }
        }
    }
    Err(last.map_or_else(
        || Failure::needs_operator("the join token names no gateway"),
        |e| Failure::transient(format!("no gateway accepted the join: {}", e.message)),
    ))
}

/// The gateways a node knows without contacting one: the one that answered last and the
/// others its cache lists, then the session's. Only that part of the cache is read (no
/// signature checks: a gateway still has to prove the cluster's CA).
pub fn known_gateway_urls(state_dir: &Path, session: &SessionFile) -> Vec<String> {
    #[derive(Deserialize, Default)]
    struct Known {
        #[serde(default)]
        gateways: Vec<String>,
        #[serde(default)]
        gateway: Option<String>,
    }
    let known: Known = std::fs::read(cache_path(state_dir))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let last: Vec<String> = known.gateway.into_iter().collect();
    known_gateways([&last[..], &known.gateways, &session.gateways])
}

/// `services discover` through the gateways: every instance of `service` in one request, from
/// the first of `gateways` (see [`known_gateway_urls`]) that answers.
pub async fn discover(
    session: &SessionFile,
    gateways: &[String],
    service: &str,
) -> Result<Vec<ServiceInstance>, CallError> {
    let mut client = GatewayClient::new(session.root.0);
    client.set_session(session.session.bearer().as_str());
    let mut last = None;
    for url in gateways {
        match client.services(url, service).await {
            Ok(answer) => return Ok(answer.body.services),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| CallError {
        retry: Retry::NeedsOperator,
        message: "the gateway session names no gateway".into(),
        status: None,
        retry_after: None,
        last_seq: None,
    }))
}

/// The mesh addresses of the peers in the verified cache (this node left out), for the
/// per-peer fan-out when no gateway answers.
pub fn cached_peer_addresses(
    state_dir: &Path,
    session: &SessionFile,
    grace: Duration,
) -> Vec<IpAddr> {
    let Ok(Some((set, file, _))) = load_cache(&cache_path(state_dir), session.root) else {
        return Vec::new();
    };
    let grace = Grace::Offline {
        since: file.saved_at,
        grace: grace.as_secs(),
    };
    set.peers(unix_now(), grace)
        .into_iter()
        .filter(|p| p.node_id != session.node_id)
        .filter_map(|p| {
            p.addresses
                .into_iter()
                .find(|a| session.mesh_cidr.contains(a))
        })
        .collect()
}

/// This host's addresses outside the mesh, with the WireGuard port: where peers may reach it.
/// The gateway adds the source address it saw when this is empty.
pub fn host_endpoints(listen_port: u16, mesh_cidr: IpNet, interface: &str) -> Vec<SocketAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = addrs
        .filter(|ifa| ifa.interface_name != interface)
        .filter_map(|ifa| {
            let sock = ifa.address?;
            let ip: IpAddr = if let Some(v4) = sock.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(sock.as_sockaddr_in6()?.ip())
            };
            let usable = match ip {
                IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
                IpAddr::V6(v6) => {
                    !v6.is_loopback()
                        && !v6.is_unspecified()
                        && (v6.segments()[0] & 0xffc0) != 0xfe80
                }
            };
            (usable && !mesh_cidr.contains(&ip)).then_some(SocketAddr::new(ip, listen_port))
        })
        .collect();
    out.sort();
    out.dedup();
    // Peers use the first endpoint: the address this host would send from by default (its
    // default route's), not whichever sorts first (a container bridge, say).
    let preferred = [preferred_source(false), preferred_source(true)];
    out.sort_by_key(|a| !preferred.contains(&Some(a.ip())));
    out.truncate(8);
    out
}

/// The source address the kernel picks towards a documentation address (no packet is sent:
/// connecting a UDP socket only looks the route up).
fn preferred_source(v6: bool) -> Option<IpAddr> {
    let (bind, probe) = if v6 {
        ("[::]:0", "[2001:db8::1]:51820")
    } else {
        ("0.0.0.0:0", "192.0.2.1:51820")
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(probe).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// The cursor to poll with after `update`. A delta with items this node refused (a signer
/// not yet valid on a skewed clock, a key still held because of ordering) is not kept: the next
/// poll asks for a snapshot, which sends them again. A snapshot's cursor is kept even with
/// refusals: asking again would only bring the same answer.
fn keep_cursor(update: &Update, rejected: &[(String, Reject)]) -> Option<Cursor> {
    (rejected.is_empty() || update.kind == UpdateKind::Snapshot).then_some(update.cursor)
}

/// The refused items of an answer, for status.
fn left_out(url: &str, rejected: &[(String, Reject)]) -> Vec<String> {
    rejected
        .iter()
        .map(|(what, why)| format!("gateway {url}: left out {what}: {why}"))
        .collect()
}

/// What applying one answer changed, for the poll task to act on.
struct Absorbed {
    /// Every gateway known now, the one that answered first.
    gateways: Vec<String>,
    touched: bool,
    came_back: bool,
    /// To write, when the cursor moved.
    cache: Option<CacheFile>,
}

/// Decode `raw` and apply it to the shared set. Inflating, parsing and verifying every
/// signature of a large snapshot takes the better part of a second, so it runs on the
/// blocking pool against a copy of the set (status and the mesh keep reading the current one)
/// and the result is swapped in; the poll task awaits it, so answers still apply in order.
async fn apply_answer(
    shared: &Arc<Shared>,
    url: &str,
    raw: Raw,
    now: u64,
) -> Result<Absorbed, CallError> {
    let (prior, was_live, prior_gateways, bootstrap) = {
        let inner = shared.lock();
        (
            inner.cursor,
            inner.mode == Mode::Live,
            inner.gateways.clone(),
            inner.bootstrap.clone(),
        )
    };
    let worker = {
        let shared = Arc::clone(shared);
        let url = url.to_string();
        move || {
            let update: Update = client::decode(&url, &raw)?;
            drop(raw);
            let mut set = shared.lock().set.clone();
            let applied = set.apply(&update, now);
            let cursor = keep_cursor(&update, &applied.rejected);
            let signed = set.gateway_urls(now, Grace::Live);
            let gateways = gateways_after_answer(&url, &signed, &update.gateways, &bootstrap);
            // Written when the cursor moved, and when the gateways did (presence is no change).
            let cache = cursor
                .filter(|c| prior != Some(*c) || !was_live || gateways != prior_gateways)
                .map(|c| CacheFile {
                    gateways: gateways.clone(),
                    gateway: Some(url.clone()),
                    ..set.to_cache(c, now)
                });
            Ok::<_, CallError>((update, set, applied, cursor, cache, gateways))
        }
    };
    let (update, set, applied, cursor, cache, gateways) = tokio::task::spawn_blocking(worker)
        .await
        .map_err(|e| CallError::transient(format!("gateway {url}: applying the answer: {e}")))??;
    for (what, why) in &applied.rejected {
        tracing::warn!(component = "gateway-client", gateway = %url, item = %what, reason = %why, "gateway update item rejected");
    }
    let mut inner = shared.lock();
    // The set replaced is dropped outside the lock.
    let _old = std::mem::replace(&mut inner.set, set);
    match update.kind {
        UpdateKind::Snapshot => inner.snapshots += 1,
        UpdateKind::Delta => inner.deltas += 1,
    }
    let came_back = inner.mode != Mode::Live;
    if came_back {
        inner.mode = Mode::Live;
        inner.since = now;
        inner.problems.clear();
    }
    let left_out = left_out(url, &applied.rejected);
    inner.cursor = cursor;
    if update.kind == UpdateKind::Snapshot || !left_out.is_empty() {
        inner.problems = left_out;
    }
    inner.answered_at = Some(now);
    inner.url = Some(url.to_string());
    // Status sees the answering gateway and its list together (the rotation follows).
    inner.current = Some(url.to_string());
    inner.gateways.clone_from(&gateways);
    drop(inner);
    Ok(Absorbed {
        gateways,
        touched: applied.touched(),
        came_back,
        cache,
    })
}

/// The poll task's own state.
struct Poller {
    client: GatewayClient,
    rotation: Rotation,
    adverts: Adverts,
    shared: Arc<Shared>,
    cache: PathBuf,
    recheck: Recheck,
    source: AdvertSource,
    gpus: GpuWatch,
}

/// The GPU summary the shell keeps current (see `mesh::GpuSummaryCell`).
pub type GpuWatch = tokio::sync::watch::Receiver<Option<(u32, String, u64)>>;

impl Poller {
    async fn run(mut self) {
        let mut attempt: u32 = 0;
        loop {
            let Some(url) = self.rotation.current().map(str::to_string) else {
                tracing::error!(
                    component = "gateway-client",
                    "no gateway URL known; running on the cached peer set"
                );
                return;
            };
            let (cursor, live) = {
                let inner = self.shared.lock();
                (inner.cursor, inner.mode == Mode::Live)
            };
            let result = {
                let wait = crate::core::coord::client::poll_wait(live, POLL_WAIT);
                let poll = self.client.poll(&url, cursor.as_ref(), wait);
                tokio::pin!(poll);
                loop {
                    tokio::select! {
                        result = &mut poll => break result,
                        Ok(()) = self.gpus.changed() => {
                            let summary = self.gpus.borrow_and_update().clone();
                            self.shared.set_gpus(summary);
                        }
                        () = self.shared.advert_changed.notified() => {
                            // Sent beside the long poll (another connection), which keeps waiting.
                            send_advert(&self.client, &mut self.adverts, &self.source, &url).await;
                        }
                    }
                }
            };
            let result = match result {
                Ok(answer) => self.applied(&url, answer).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(()) => {
                    attempt = 0;
                    self.rotation.succeeded(fastrand::u64(..));
                    self.publish();
                    send_advert(&self.client, &mut self.adverts, &self.source, &url).await;
                }
                Err(error) => {
                    attempt = attempt.saturating_add(1);
                    self.failed(&url, &error);
                    self.rotation.failed(fastrand::u64(..));
                    self.publish();
                    if let Some(next) = self.rotation.current() {
                        tracing::info!(component = "gateway-client", failed = %url, next = %next, "trying the next gateway with the same cursor");
                    }
                    let delay = retry_delay(attempt, fastrand::u32(..), error.retry_after);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// What a node's advert is made of.
struct AdvertSource {
    shared: Arc<Shared>,
    node_id: NodeId,
    listen_port: u16,
    interface: String,
    mesh_cidr: IpNet,
}

/// Send this node's advert if it changed. A 409 that names the gateway's last sequence number
/// (adverts from before a restart, with the clock since stepped back) is answered at once with
/// a number above it.
async fn send_advert(
    client: &GatewayClient,
    adverts: &mut Adverts,
    source: &AdvertSource,
    url: &str,
) {
    for _ in 0..2 {
        let Some((content, seq, advert)) = source.due(adverts) else {
            return;
        };
        match client.put_self(url, &advert).await {
            Ok(()) => return adverts.sent(content, seq),
            Err(e) => {
                if let Some(last) = e.last_seq.filter(|_| e.status == Some(409))
                    && last >= seq
                {
                    tracing::info!(component = "gateway-client", gateway = %url, seq, last, "the gateway holds a newer advert of this node (clock stepped back?); continuing above it");
                    adverts.stale(last);
                    continue;
                }
                tracing::warn!(component = "gateway-client", gateway = %url, error = %e.message, "advert not accepted; sent again with the next answer");
                return;
            }
        }
    }
}

impl AdvertSource {
    /// The advert to send, if this node's endpoints, services or GPUs changed since the last.
    fn due(&self, adverts: &Adverts) -> Option<(AdvertContent, u64, Advert)> {
        let endpoints = host_endpoints(self.listen_port, self.mesh_cidr, &self.interface);
        let (services, gpus) = {
            let inner = self.shared.lock();
            (inner.services.clone(), inner.gpus.clone())
        };
        let content = AdvertContent::new(endpoints, services, gpus);
        let seq = adverts.due(&content, unix_now_ms())?;
        let advert = Advert {
            node_id: self.node_id,
            seq,
            endpoints: content.endpoints.clone(),
            services: content
                .services
                .iter()
                .map(|(name, port)| AdvertService {
                    name: name.clone(),
                    port: *port,
                })
                .collect(),
            gpus: content
                .gpus
                .clone()
                .map(|(count, model, memory_mib)| GpuSummary {
                    count,
                    model,
                    memory_mib,
                }),
        };
        Some((content, seq, advert))
    }
}

impl Poller {
    /// The rotation's list and current gateway, for status.
    fn publish(&self) {
        let mut inner = self.shared.lock();
        if inner.gateways != self.rotation.urls() {
            inner.gateways = self.rotation.urls().to_vec();
        }
        inner.current = self.rotation.current().map(str::to_owned);
    }

    async fn applied(&mut self, url: &str, answer: Answer<Raw>) -> Result<(), CallError> {
        let done = apply_answer(&self.shared, url, answer.body, unix_now()).await?;
        if !done.gateways.is_empty() {
            self.rotation.set_urls(done.gateways, fastrand::u64(..));
        }
        if done.came_back {
            tracing::info!(component = "gateway-client", gateway = %url, "gateway answered; peer set live");
            // A restarted gateway or a new session has no advert of ours.
            self.adverts.forget();
        }
        if let Some(cache) = done.cache {
            let path = self.cache.clone();
            let saved = tokio::task::spawn_blocking(move || save_json(&path, &cache)).await;
            if let Ok(Err(error)) = saved {
                tracing::warn!(component = "gateway-client", %error, "cannot write the peer cache");
            }
        }
        if done.touched || done.came_back {
            self.recheck.request("gateway peer set changed");
        }
        Ok(())
    }

    fn failed(&mut self, url: &str, error: &CallError) {
        let now = unix_now();
        let went_offline = {
            let mut inner = self.shared.lock();
            let was = inner.mode;
            if was == Mode::Live {
                inner.mode = Mode::Cached;
                inner.since = inner.answered_at.unwrap_or(now);
            } else if was == Mode::Joining && inner.cursor.is_none() {
                // Nothing cached: still joining.
            }
            inner.problems = vec![format!("gateway: {}", error.message)];
            was == Mode::Live
        };
        match error.retry {
            Retry::Transient => {
                tracing::warn!(component = "gateway-client", gateway = %url, error = %error.message, "gateway unreachable; keeping the current peers")
            }
            Retry::NeedsOperator => {
                tracing::error!(component = "gateway-client", gateway = %url, error = %error.message, "gateway refused this node; keeping the current peers")
            }
        }
        if went_offline {
            self.recheck.request("gateway unreachable");
        }
    }
}

#[cfg(test)]
mod tests;
