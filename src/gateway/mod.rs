//! The gateway role: the cluster's signing identity, the store of nodes and tokens, the
//! in-memory view every node's long-poll is served from, and the HTTPS endpoint.
//!
//! Files under `<state_dir>/gateway/`: `root.key` (the cluster identity, Ed25519 PKCS#8;
//! needed only to authorise signers and to issue this gateway's TLS certificate, so it can be
//! moved offline once `tls.crt`/`tls.key` exist), `signer.key` (this gateway's record-signing
//! key), `ca.pem` (the self-signed CA for the root key), `tls.crt`/`tls.key` (the leaf, reissued
//! at each start while the root key is present) and `store.sqlite`.
//!
//! The gateway node is itself a mesh node: at each start the gateway registers its own record
//! (roles node + gateway, its configured `[network.wireguard] address` and key) in its own
//! store, without a token, and writes `<state_dir>/gateway-session.json` for the node client,
//! which then polls its own gateway like every other node.

pub mod admin;
#[cfg(feature = "store-etcd")]
pub mod etcd;
pub mod request;
pub mod server;
pub mod sqlite;
pub mod store;
pub mod tls;
pub mod view;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SecureRandom as _;
use zeroize::Zeroizing;

use crate::config::{Config, GatewayStore};
use crate::core::coord::{
    self, Cursor, JoinToken, KeyId, Role, RootKey, Secret32, Session, TokenId,
};
use crate::core::peer_diff::PeerKey;
use crate::state;

pub use server::Gateway;
pub use sqlite::SqliteStore;
pub use store::Store;
pub use view::View;

/// A gateway failure; `transient` says whether retrying may help (otherwise the operator must
/// act: run `gateway init`, fix a file, free the port).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct GatewayError {
    pub message: String,
    pub transient: bool,
}

impl GatewayError {
    pub fn operator(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: false,
        }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: true,
        }
    }
}

impl From<store::StoreError> for GatewayError {
    fn from(e: store::StoreError) -> Self {
        Self {
            message: e.to_string(),
            transient: e.transient,
        }
    }
}

/// Where the gateway's files live.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
    pub root_key: PathBuf,
    pub signer_key: PathBuf,
    pub ca_pem: PathBuf,
    pub tls_crt: PathBuf,
    pub tls_key: PathBuf,
    pub store: PathBuf,
    /// The node client's session file (in `state_dir`, beside the other node state).
    pub session_file: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path) -> Self {
        let dir = state_dir.join("gateway");
        Self {
            root_key: dir.join("root.key"),
            signer_key: dir.join("signer.key"),
            ca_pem: dir.join("ca.pem"),
            tls_crt: dir.join("tls.crt"),
            tls_key: dir.join("tls.key"),
            store: dir.join("store.sqlite"),
            session_file: state_dir.join("gateway-session.json"),
            dir,
        }
    }
}

/// This gateway's record-signing key.
pub struct Signer {
    pub pkcs8: Zeroizing<Vec<u8>>,
    pub key_id: KeyId,
}

impl Signer {
    pub fn load(path: &Path) -> Result<Self, GatewayError> {
        let pkcs8 = Zeroizing::new(read(path)?);
        let public = coord::public_key_of_pkcs8(&pkcs8)
            .map_err(|e| GatewayError::operator(format!("{}: {e}", path.display())))?;
        Ok(Self {
            pkcs8,
            key_id: KeyId::of(&public),
        })
    }

    #[cfg(test)]
    pub fn load_bytes(pkcs8: Vec<u8>) -> Self {
        let public = coord::public_key_of_pkcs8(&pkcs8).expect("a test key");
        Self {
            pkcs8: Zeroizing::new(pkcs8),
            key_id: KeyId::of(&public),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, GatewayError> {
    std::fs::read(path).map_err(|e| {
        GatewayError::operator(format!(
            "cannot read {}: {e}{}",
            path.display(),
            if e.kind() == std::io::ErrorKind::NotFound {
                " (run `clawnode gateway init` first)"
            } else {
                ""
            }
        ))
    })
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// 32 bytes from the OS's random source.
pub fn random_32() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    // The OS generator fails only on a broken system; a zero secret must never be handed out.
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the OS random number generator failed");
    bytes
}

fn new_ed25519_pkcs8() -> Zeroizing<Vec<u8>> {
    coord::ed25519_pkcs8_from_seed(&random_32())
}

fn state_err(e: state::StateError) -> GatewayError {
    GatewayError::operator(e.to_string())
}

/// Signer certificates are valid this long (10 years): the root key, which may be offline,
/// is needed to renew them.
pub const SIGNER_LIFETIME_S: u64 = 10 * 365 * 24 * 3600;

/// What `gateway init` made.
#[derive(Debug, Clone)]
pub struct Initialised {
    pub dir: PathBuf,
    pub root: RootKey,
    pub signer: KeyId,
    pub store_id: u64,
}

/// Create the cluster identity and this gateway's signer and store, once. With etcd the
/// store is the cluster's: a prefix that already holds one is refused (a further gateway
/// gets its signer with `gateway signer add` instead).
pub fn init(config: &Config, now: u64) -> Result<Initialised, GatewayError> {
    let paths = Paths::new(&config.node.state_dir);
    let store_id = u64::from_be_bytes(random_32()[..8].try_into().unwrap_or([1; 8]));
    if paths.root_key.exists() || paths.store.exists() {
        return Err(GatewayError::operator(format!(
            "a gateway is already initialised in {} (its root key and store are kept; remove the directory only to start a new cluster, which every node must then rejoin)",
            paths.dir.display()
        )));
    }
    state::ensure_private_dir(&config.node.state_dir).map_err(state_err)?;
    state::ensure_private_dir(&paths.dir).map_err(state_err)?;
    let root_pkcs8 = new_ed25519_pkcs8();
    let root = RootKey::from_pkcs8(&root_pkcs8)
        .map_err(|e| GatewayError::operator(format!("root key: {e}")))?;
    if !state::create_exclusive(&paths.root_key, &root_pkcs8, 0o600).map_err(state_err)? {
        return Err(GatewayError::operator(format!(
            "{} appeared meanwhile: another `gateway init` is running",
            paths.root_key.display()
        )));
    }
    let ca = tls::ca_pem(&root_pkcs8)?;
    state::write_atomic(&paths.ca_pem, ca.as_bytes(), 0o644).map_err(state_err)?;
    let signer_pkcs8 = new_ed25519_pkcs8();
    state::write_atomic(&paths.signer_key, &signer_pkcs8, 0o600).map_err(state_err)?;
    let signer_public = coord::public_key_of_pkcs8(&signer_pkcs8)
        .map_err(|e| GatewayError::operator(format!("signer key: {e}")))?;
    let cert = coord::sign_signer(
        signer_public,
        config.node.name.as_str(),
        1,
        now + SIGNER_LIFETIME_S,
        &root_pkcs8,
    )
    .map_err(|e| GatewayError::operator(format!("signer certificate: {e}")))?;
    // The etcd prefix is claimed only once the keys are safely on disk (a claimed prefix
    // without its root key could only be fixed with etcdctl); a refused claim takes the new
    // files back, so init can simply be run again.
    if let GatewayStore::Etcd(etcd) = &config.gateway.store
        && let Err(error) = admin::create_etcd_cluster(etcd, store_id)
    {
        for path in [&paths.root_key, &paths.ca_pem, &paths.signer_key] {
            let _ = std::fs::remove_file(path);
        }
        return Err(error);
    }
    match &config.gateway.store {
        GatewayStore::Sqlite => {
            SqliteStore::create(&paths.store, store_id)?.put_signer_blocking(cert)?;
        }
        GatewayStore::Etcd(_) => {
            admin::with_store!(config, |store| async move {
                store.put_signer(cert).await?;
                Ok::<_, GatewayError>(())
            })?;
        }
    }
    Ok(Initialised {
        dir: paths.dir,
        root,
        signer: KeyId::of(&signer_public),
        store_id,
    })
}

/// The URL nodes are told: `[gateway] public_url`, else the mesh address and listen port.
pub fn public_url(config: &Config) -> Result<String, GatewayError> {
    if let Some(url) = &config.gateway.public_url {
        return Ok(url.clone());
    }
    let Some(address) = config.network.wireguard.address else {
        return Err(GatewayError::operator(
            "[gateway] public_url is unset and [network.wireguard] address too: set one so nodes know where to reach this gateway",
        ));
    };
    Ok(match address.addr() {
        IpAddr::V4(v4) => format!("https://{v4}:{}", config.gateway.listen.port()),
        IpAddr::V6(v6) => format!("https://[{v6}]:{}", config.gateway.listen.port()),
    })
}

/// A join token for `gateway token create`: stored as a hash, returned whole (print it once).
pub fn create_token(
    config: &Config,
    ttl: Duration,
    uses: u32,
    now: u64,
) -> Result<(JoinToken, u64), GatewayError> {
    let paths = Paths::new(&config.node.state_dir);
    let root = root_of(&paths)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&random_32()[..8]);
    let secret = Secret32(random_32());
    let expires_at = now + ttl.as_secs();
    let new = store::NewToken {
        id: TokenId(id).to_string(),
        hash: coord::token_hash(&secret),
        expires_at,
        uses,
        now,
    };
    let own = public_url(config)?;
    let urls = admin::with_store!(config, |store| async move {
        store.create_token(new).await?;
        Ok::<_, GatewayError>(admin::token_urls(&store, own))
    })?;
    let token = JoinToken {
        id: TokenId(id),
        secret,
        root,
        urls,
    };
    Ok((token, expires_at))
}

/// The cluster's root public key, from the CA certificate (the root key itself may be offline).
pub fn root_of(paths: &Paths) -> Result<RootKey, GatewayError> {
    if let Ok(pkcs8) = std::fs::read(&paths.root_key) {
        let pkcs8 = Zeroizing::new(pkcs8);
        return RootKey::from_pkcs8(&pkcs8)
            .map_err(|e| GatewayError::operator(format!("{}: {e}", paths.root_key.display())));
    }
    let pem = String::from_utf8(read(&paths.ca_pem)?)
        .map_err(|_| GatewayError::operator("ca.pem is not text"))?;
    let der = tls::pem_to_der(&pem).ok_or_else(|| {
        GatewayError::operator(format!("{} holds no certificate", paths.ca_pem.display()))
    })?;
    // An Ed25519 SubjectPublicKeyInfo ends with the raw 32-byte key after this prefix.
    const ED25519_SPKI: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let at = der
        .windows(ED25519_SPKI.len())
        .position(|w| w == ED25519_SPKI)
        .ok_or_else(|| GatewayError::operator("ca.pem holds no Ed25519 key"))?;
    let key: [u8; 32] = der
        .get(at + ED25519_SPKI.len()..at + ED25519_SPKI.len() + 32)
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| GatewayError::operator("ca.pem's key is cut short"))?;
    Ok(RootKey(key))
}

/// Revoke a node (by name or `n<id>`), signed by this gateway's signer.
pub fn revoke(config: &Config, node: &str) -> Result<store::NodeRow, GatewayError> {
    let paths = Paths::new(&config.node.state_dir);
    let signer = Signer::load(&paths.signer_key)?;
    admin::with_store!(config, |store| async move {
        let row = admin::find_node(&store, node)
            .await?
            .ok_or_else(|| GatewayError::operator(format!("no node named {node}")))?;
        let revocation = coord::sign_revocation(row.node_id, u64::MAX, &signer.pkcs8)
            .map_err(|e| GatewayError::operator(e.to_string()))?;
        store.revoke(revocation).await?;
        Ok::<_, GatewayError>(row)
    })
}

pub fn nodes(config: &Config) -> Result<Vec<store::NodeRow>, GatewayError> {
    admin::with_store!(config, |store| async move {
        Ok::<_, GatewayError>(store.nodes().await?)
    })
}

/// The node client's session file on the gateway node: the same shape a join writes.
#[derive(serde::Serialize)]
struct SessionFile<'a> {
    root: RootKey,
    node_id: coord::NodeId,
    session: &'a Session,
    address: IpAddr,
    mesh_cidr: ipnet::IpNet,
    gateways: &'a [String],
    cursor: Option<Cursor>,
}

/// A running gateway; dropping it stops the endpoint and its tasks.
pub struct Running {
    pub addr: SocketAddr,
    pub view: Arc<View>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Held while running (the etcd presence lease): dropped with it.
    #[cfg_attr(not(feature = "store-etcd"), allow(dead_code))]
    guards: Vec<Box<dyn std::any::Any + Send>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Start the gateway role over the configured store: load the identity, register this
/// node's own record (with its WireGuard public key `own_key`), fill the view, and serve
/// HTTPS on `[gateway] listen`.
pub async fn start(config: &Config, own_key: PeerKey) -> Result<Running, GatewayError> {
    match &config.gateway.store {
        GatewayStore::Sqlite => start_sqlite(config, own_key).await,
        #[cfg(feature = "store-etcd")]
        GatewayStore::Etcd(etcd) => start_etcd(config, etcd, own_key).await,
        #[cfg(not(feature = "store-etcd"))]
        GatewayStore::Etcd(_) => Err(GatewayError::operator(admin::NO_ETCD)),
    }
}

/// The gateway over `<state_dir>/gateway/store.sqlite`.
pub async fn start_sqlite(config: &Config, own_key: PeerKey) -> Result<Running, GatewayError> {
    let paths = Paths::new(&config.node.state_dir);
    let store = Arc::new(SqliteStore::open(&paths.store)?);
    Ok(start_with(config, store, own_key, "sqlite").await?.0)
}

/// The gateway over etcd, one of several: it registers its presence under a lease, and its
/// view's gateways list follows the live ones.
#[cfg(feature = "store-etcd")]
pub async fn start_etcd(
    config: &Config,
    etcd: &crate::config::EtcdConfig,
    own_key: PeerKey,
) -> Result<Running, GatewayError> {
    if config.network.wireguard.address.is_none() {
        return Err(GatewayError::operator(
            "a gateway on etcd needs its [network.wireguard] address: its own record names it among the gateways",
        ));
    }
    let store = Arc::new(etcd::EtcdStore::open(&admin::etcd_settings(etcd)).await?);
    let (mut running, own) = start_with(config, Arc::clone(&store), own_key, "etcd").await?;
    let url = public_url(config)?;
    let presence = etcd::GatewayPresence {
        node_id: own.unwrap_or(coord::NodeId(0)),
        name: config.node.name.as_str().to_owned(),
        url: url.clone(),
        started_at: unix_now(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let guard = store.register_presence(presence).await?;
    running.guards.push(Box::new(guard));
    running.tasks.push(tokio::spawn(follow_presence(
        Arc::clone(&store),
        Arc::clone(&running.view),
        url,
    )));
    running.tasks.push(tokio::spawn(watch_writable(
        Arc::clone(&store),
        Arc::clone(&running.view),
    )));
    Ok(running)
}

/// Keep the view's gateways list at the live gateways' URLs, this one first.
#[cfg(feature = "store-etcd")]
async fn follow_presence(store: Arc<etcd::EtcdStore>, view: Arc<View>, own: String) {
    let mut changes = store.presence_changes();
    loop {
        let mut alive = store.gateways_alive();
        alive.sort_by(|a, b| (a.started_at, &a.url).cmp(&(b.started_at, &b.url)));
        let mut urls = vec![own.clone()];
        for presence in alive {
            if !urls.contains(&presence.url) {
                urls.push(presence.url);
            }
        }
        view.set_gateways(urls);
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// How often the gateway asks etcd whether it takes writes, so `/v1/status` says so even
/// when no join or advert has failed yet.
#[cfg(feature = "store-etcd")]
const WRITABLE_EVERY: Duration = Duration::from_secs(3);

#[cfg(feature = "store-etcd")]
async fn watch_writable(store: Arc<etcd::EtcdStore>, view: Arc<View>) {
    let mut tick = tokio::time::interval(WRITABLE_EVERY);
    loop {
        tick.tick().await;
        // Only whether writes can succeed: not `cluster()`, which opens a connection to every
        // endpoint for `gateway status`.
        match store.quorum_read().await {
            Ok(_) => view.store_wrote(),
            Err(error) => view.store_refused(&error.message),
        }
    }
}

async fn start_with<S: Store>(
    config: &Config,
    store: Arc<S>,
    own_key: PeerKey,
    kind: &str,
) -> Result<(Running, Option<coord::NodeId>), GatewayError> {
    let paths = Paths::new(&config.node.state_dir);
    let signer = Arc::new(Signer::load(&paths.signer_key)?);
    let root = root_of(&paths)?;
    let url = public_url(config)?;
    let gateways = vec![url.clone()];
    let wg = &config.network.wireguard;
    let own_address = wg.address.map(|a| a.addr());
    let view = Arc::new(View::new(store.store_id(), gateways.clone()));
    view.set_store_health(view::StoreHealth {
        kind: kind.to_owned(),
        writable: true,
        reason: None,
    });
    let gateway = Arc::new(Gateway {
        store: Arc::clone(&store),
        view: Arc::clone(&view),
        signer,
        pool: config.gateway.address_pool,
        mesh_cidr: wg.mesh_cidr,
        reserved: own_address.into_iter().collect(),
        gateways,
        record_lifetime: config.gateway.record_lifetime.as_secs(),
        max_sessions: config.gateway.max_sessions,
    });
    let now = unix_now();
    // A revoked signer must not sign again: its records would replace the ones another
    // gateway re-signed, and nodes would drop them.
    let (_, state) = store.snapshot().await?;
    if let Some(cert) = state
        .signers
        .iter()
        .find(|c| c.key_id == gateway.signer.key_id)
        && now > cert.not_after
    {
        return Err(GatewayError::operator(format!(
            "this gateway's signer {} ({}) is revoked or expired: ask an operator with root.key for a new one (`clawnode gateway signer add`)",
            cert.name, cert.key_id
        )));
    }
    let mut own = None;
    if let Some(address) = own_address {
        own = Some(register_self(config, &gateway, &paths, root, (address, own_key), now).await?);
    }
    view::load(&*store, &view).await?;
    let tls = tls_config(config, &paths, &url)?;
    let listener = crate::http::bind_free(config.gateway.listen).map_err(|e| {
        GatewayError::operator(format!(
            "cannot listen on [gateway] listen {}: {e}",
            config.gateway.listen
        ))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| GatewayError::transient(e.to_string()))?;
    let mut tasks = vec![
        tokio::spawn(view::feed(Arc::clone(&store), Arc::clone(&view))),
        tokio::spawn(server::serve(Arc::clone(&gateway), listener, tls)),
    ];
    let upkeep = Arc::clone(&gateway);
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            let now = unix_now();
            let resigned = upkeep.resign_due(now).await;
            if resigned > 0 {
                tracing::info!(
                    component = "gateway",
                    resigned,
                    "records re-signed before expiry"
                );
            }
            if let Err(error) = upkeep.store.compact(now).await {
                tracing::warn!(component = "gateway", %error, "compaction failed");
            }
        }
    }));
    tracing::info!(component = "gateway", listen = %addr, url = %url, store = kind, rev = view.head(), "gateway serving");
    Ok((
        Running {
            addr,
            view,
            tasks,
            guards: Vec::new(),
        },
        own,
    ))
}

/// The leaf certificate: issued now when the root key is here, else the one kept from the
/// last start.
fn tls_config(
    config: &Config,
    paths: &Paths,
    url: &str,
) -> Result<Arc<rustls::ServerConfig>, GatewayError> {
    let ca_pem = String::from_utf8(read(&paths.ca_pem)?)
        .map_err(|_| GatewayError::operator("ca.pem is not text"))?;
    let ca_der = tls::pem_to_der(&ca_pem).ok_or_else(|| {
        GatewayError::operator(format!("{} holds no certificate", paths.ca_pem.display()))
    })?;
    let (leaf, key) = match std::fs::read(&paths.root_key) {
        Ok(root_pkcs8) => {
            let root_pkcs8 = Zeroizing::new(root_pkcs8);
            let mut names = Vec::new();
            if let Ok((host, _)) = coord::split_gateway_url(url) {
                names.push(host);
            }
            let listen = config.gateway.listen.ip();
            if !listen.is_unspecified() {
                names.push(listen.to_string());
            }
            if let Some(address) = config.network.wireguard.address {
                names.push(address.addr().to_string());
            }
            names.sort();
            names.dedup();
            let (leaf, key) = tls::issue_leaf(&root_pkcs8, &names, unix_now())?;
            state::write_atomic(&paths.tls_crt, &leaf, 0o644).map_err(state_err)?;
            state::write_atomic(&paths.tls_key, &key, 0o600).map_err(state_err)?;
            (leaf, key)
        }
        Err(_) => {
            let leaf = read(&paths.tls_crt)?;
            // Without the root key the kept leaf cannot be renewed: say so well before it ends.
            let now = unix_now();
            match tls::not_after(&leaf) {
                Some(end) if end <= now + tls::LEAF_WARN_S => tracing::warn!(
                    component = "gateway",
                    days_left = end.saturating_sub(now) / 86_400,
                    "the TLS certificate expires soon and cannot be re-issued without root.key: put it back in the gateway directory and restart"
                ),
                Some(_) => {}
                None => tracing::warn!(component = "gateway", "tls.crt's expiry does not parse"),
            }
            (leaf, read(&paths.tls_key)?)
        }
    };
    tls::server_config(leaf, key, ca_der)
}

/// The gateway's own record (roles node + gateway) and the node client's session file.
async fn register_self<S: Store>(
    config: &Config,
    gateway: &Gateway<S>,
    paths: &Paths,
    root: RootKey,
    (address, key): (IpAddr, PeerKey),
    now: u64,
) -> Result<coord::NodeId, GatewayError> {
    let wg = &config.network.wireguard;
    let secret = Secret32(random_32());
    let session_hash = secret.hash();
    let name = config.node.name.as_str().to_owned();
    let txn = store::JoinTxn {
        token: None,
        now,
        name: name.clone(),
        wg_key: coord::b64::wg_key_to_string(&key),
        requested_address: Some(address),
        session_hash,
        pool: wg.mesh_cidr,
        reserved: Vec::new(),
        sign: gateway.sign_fn(
            name,
            key,
            vec![Role::Node, Role::Gateway],
            Some(public_url(config)?),
            now,
        ),
    };
    let joined = gateway.store.join(txn).await.map_err(|e| {
        GatewayError::operator(format!("cannot register this gateway's own record: {e}"))
    })?;
    let node_id = joined.record.node_id;
    let session = Session { node_id, secret };
    let file = SessionFile {
        root,
        node_id,
        session: &session,
        address,
        mesh_cidr: wg.mesh_cidr,
        gateways: &gateway.gateways,
        cursor: None,
    };
    let bytes = Zeroizing::new(serde_json::to_vec_pretty(&file).unwrap_or_default());
    state::write_atomic(&paths.session_file, &bytes, 0o600).map_err(state_err)?;
    tracing::info!(component = "gateway", %node_id, %address, "this gateway's own record registered");
    Ok(node_id)
}

/// The gateway on its own thread and runtime, so a crowd of long-polls never delays the
/// daemon's supervisor (which runs on one thread). Dropping it stops the gateway.
pub struct Thread {
    pub addr: SocketAddr,
    /// The gateway's view, for its counters (`server::status_json`) in status and metrics.
    pub view: Arc<View>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Thread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Raise the soft descriptor limit toward what `max_sessions` connections need (the unit's
/// `LimitNOFILE` is the hard cap); returns the soft limit now in force.
fn raise_fd_limit(max_sessions: usize) -> u64 {
    let want = (max_sessions as u64).saturating_add(server::OVERFLOW as u64 + 256);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only `limit`, which outlives the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        let target = want.min(limit.rlim_max);
        if target > limit.rlim_cur {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = target;
            }
        }
    }
    if limit.rlim_cur < want {
        tracing::warn!(
            component = "gateway",
            limit = limit.rlim_cur,
            max_sessions,
            "the descriptor limit is below what max_sessions needs: sessions are capped to fit (raise LimitNOFILE to serve more)"
        );
    }
    limit.rlim_cur
}

/// Start the gateway role on a thread of its own; returns once it listens (or failed to).
pub fn spawn(mut config: Config, own_key: PeerKey) -> Result<Thread, GatewayError> {
    let limit = raise_fd_limit(config.gateway.max_sessions);
    // Past the descriptor limit accept would fail (EMFILE); below it, nodes get a 503.
    let fits = limit.saturating_sub(server::OVERFLOW as u64 + 256).max(64);
    config.gateway.max_sessions = config.gateway.max_sessions.min(fits as usize);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("gateway".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("gateway")
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(GatewayError::transient(e.to_string())));
                    return;
                }
            };
            runtime.block_on(async move {
                match start(&config, own_key).await {
                    Ok(running) => {
                        let _ = ready_tx.send(Ok((running.addr, Arc::clone(&running.view))));
                        let _ = stop_rx.await;
                        drop(running);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(|e| GatewayError::transient(e.to_string()))?;
    let (addr, view) = ready_rx
        .recv()
        .map_err(|_| GatewayError::transient("the gateway thread ended before it started"))??;
    Ok(Thread {
        addr,
        view,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}
