//! The admin commands' store access: each opens the configured store (sqlite or etcd) for
//! one command on a runtime of its own, and signer management (`gateway signer add | revoke |
//! list`) and `gateway status`, which work the same over either store.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use zeroize::Zeroizing;

use super::store::{NodeRow, Store};
use super::{GatewayError, Paths, SIGNER_LIFETIME_S, Signer, state_err, tls};
use crate::config::{Config, EtcdConfig, GatewayStore};
use crate::core::coord::{self, KeyId, NodeId, SignerCert};
use crate::state;

/// Run `make()`'s future on a current-thread runtime of its own thread, so the admin
/// functions work from a plain CLI and from inside a runtime (the tests) alike.
pub fn block_on<T, Fut>(make: impl FnOnce() -> Fut + Send) -> Result<T, GatewayError>
where
    T: Send,
    Fut: Future<Output = Result<T, GatewayError>>,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| GatewayError::transient(format!("cannot start a runtime: {e}")))?;
                runtime.block_on(make())
            })
            .join()
            .unwrap_or_else(|_| Err(GatewayError::transient("the store thread panicked")))
    })
}

/// Why `store = "etcd"` cannot work in this build.
pub const NO_ETCD: &str = "this clawnode was built without the etcd store (cargo feature store-etcd): use a package build or store = \"sqlite\"";

#[cfg(feature = "store-etcd")]
pub fn etcd_settings(etcd: &EtcdConfig) -> super::etcd::EtcdSettings {
    super::etcd::EtcdSettings {
        endpoints: etcd.endpoints.clone(),
        prefix: etcd.prefix.clone(),
        ca_file: etcd.ca_file.clone(),
        cert_file: etcd.cert_file.clone(),
        key_file: etcd.key_file.clone(),
    }
}

/// Run `$body` (an async block using `$store`) against the configured store, opened for it.
/// A macro, not a function: the body is generic over the store type.
macro_rules! with_store {
    ($config:expr, |$store:ident| $body:expr) => {
        $crate::gateway::admin::block_on(|| async {
            let config: &$crate::config::Config = $config;
            let out: Result<_, $crate::gateway::GatewayError> = match &config.gateway.store {
                $crate::config::GatewayStore::Sqlite => {
                    let path = $crate::gateway::Paths::new(&config.node.state_dir).store;
                    match $crate::gateway::SqliteStore::open(&path) {
                        Ok($store) => $body.await,
                        Err(e) => Err(e.into()),
                    }
                }
                #[cfg(feature = "store-etcd")]
                $crate::config::GatewayStore::Etcd(etcd) => {
                    let settings = $crate::gateway::admin::etcd_settings(etcd);
                    match $crate::gateway::etcd::EtcdStore::open(&settings).await {
                        Ok($store) => $body.await,
                        Err(e) => Err(e.into()),
                    }
                }
                #[cfg(not(feature = "store-etcd"))]
                $crate::config::GatewayStore::Etcd(_) => Err(
                    $crate::gateway::GatewayError::operator($crate::gateway::admin::NO_ETCD),
                ),
            };
            out
        })
    };
}
pub(crate) use with_store;

/// `gateway init` with etcd: claim the prefix for a new cluster, or refuse when it holds one.
pub fn create_etcd_cluster(etcd: &EtcdConfig, store_id: u64) -> Result<(), GatewayError> {
    #[cfg(feature = "store-etcd")]
    {
        let settings = etcd_settings(etcd);
        let created =
            block_on(|| async { Ok(super::etcd::EtcdStore::create(&settings, store_id).await?) })?;
        if !created {
            return Err(GatewayError::operator(format!(
                "etcd already holds a cluster under {}: this gateway joins it with a signer from an existing gateway (`clawnode gateway signer add <name> --url <url> --out <dir>` there, then copy <dir> to {}/gateway/ here)",
                etcd.prefix, "<state_dir>"
            )));
        }
        Ok(())
    }
    #[cfg(not(feature = "store-etcd"))]
    {
        let _ = (etcd, store_id);
        Err(GatewayError::operator(NO_ETCD))
    }
}

/// A node by name (the live one) or by id such as `n12`.
pub async fn find_node<S: Store>(
    store: &S,
    name_or_id: &str,
) -> Result<Option<NodeRow>, GatewayError> {
    let id = name_or_id.parse::<NodeId>().ok();
    Ok(store
        .nodes()
        .await?
        .into_iter()
        .rev()
        .find(|row| Some(row.node_id) == id || (row.name == name_or_id && !row.revoked)))
}

fn root_pkcs8(paths: &Paths) -> Result<Zeroizing<Vec<u8>>, GatewayError> {
    std::fs::read(&paths.root_key)
        .map(Zeroizing::new)
        .map_err(|e| {
            GatewayError::operator(format!(
                "cannot read {}: {e} (signers are authorised with the cluster's root key: run this where root.key is, or put it back for the command)",
                paths.root_key.display()
            ))
        })
}

/// What `gateway signer add` wrote.
#[derive(Debug, Clone)]
pub struct SignerAdded {
    pub cert: SignerCert,
    pub dir: PathBuf,
    pub tls_names: Vec<String>,
}

/// A new gateway's identity: a signer key with a root-signed certificate (put in the store,
/// so every node accepts its records), a TLS leaf for its URL's host and `addresses`, and
/// ca.pem, written to `out` for the operator to copy to the new gateway's
/// `<state_dir>/gateway/`.
pub fn signer_add(
    config: &Config,
    name: &str,
    url: &str,
    addresses: &[IpAddr],
    out: &Path,
    now: u64,
) -> Result<SignerAdded, GatewayError> {
    let paths = Paths::new(&config.node.state_dir);
    let root = root_pkcs8(&paths)?;
    if crate::config::DnsLabel::try_from(name.to_owned()).is_err() {
        return Err(GatewayError::operator(format!(
            "signer name {name:?}: expected a DNS label (the new gateway's [node] name)"
        )));
    }
    let (host, _) = coord::split_gateway_url(url).map_err(|e| {
        GatewayError::operator(format!("--url {url}: {e} (expected https://host:port)"))
    })?;
    let existing = signers(config)?;
    if existing.iter().any(|c| c.name == name && c.not_after > now) {
        return Err(GatewayError::operator(format!(
            "a signer named {name} exists already: revoke it first (`clawnode gateway signer revoke {name}`) or pick another name"
        )));
    }
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        return Err(GatewayError::operator(format!(
            "{} exists and is not empty: give a new directory",
            out.display()
        )));
    }
    state::ensure_private_dir(out).map_err(state_err)?;
    let signer_pkcs8 = super::new_ed25519_pkcs8();
    let public = coord::public_key_of_pkcs8(&signer_pkcs8)
        .map_err(|e| GatewayError::operator(format!("signer key: {e}")))?;
    let cert = coord::sign_signer(public, name, 1, now + SIGNER_LIFETIME_S, &root)
        .map_err(|e| GatewayError::operator(format!("signer certificate: {e}")))?;
    let mut names = vec![host];
    names.extend(addresses.iter().map(ToString::to_string));
    names.sort();
    names.dedup();
    let (leaf, key) = tls::issue_leaf(&root, &names, now)?;
    let ca = tls::ca_pem(&root)?;
    state::write_atomic(&out.join("signer.key"), &signer_pkcs8, 0o600).map_err(state_err)?;
    state::write_atomic(&out.join("tls.crt"), &leaf, 0o644).map_err(state_err)?;
    state::write_atomic(&out.join("tls.key"), &Zeroizing::new(key), 0o600).map_err(state_err)?;
    state::write_atomic(&out.join("ca.pem"), ca.as_bytes(), 0o644).map_err(state_err)?;
    // Written last: a signer in the store whose key was not written would be useless.
    let stored = cert.clone();
    with_store!(config, |store| async move {
        store.put_signer(stored).await?;
        Ok::<_, GatewayError>(())
    })?;
    Ok(SignerAdded {
        cert,
        dir: out.to_path_buf(),
        tls_names: names,
    })
}

/// Every signer certificate the store holds.
pub fn signers(config: &Config) -> Result<Vec<SignerCert>, GatewayError> {
    with_store!(config, |store| async move {
        let (_, state) = store.snapshot().await?;
        Ok::<_, GatewayError>(state.signers)
    })
}

/// What `gateway signer revoke` did.
#[derive(Debug, Clone)]
pub struct SignerRevoked {
    pub cert: SignerCert,
    pub resigned: usize,
}

/// Withdraw a signer: first re-sign every record it signed with this gateway's signer (so
/// no node loses a peer), then put its certificate re-issued with the next serial and already
/// expired, which is the revocation: nodes drop its records.
pub fn signer_revoke(config: &Config, name: &str, now: u64) -> Result<SignerRevoked, GatewayError> {
    let paths = Paths::new(&config.node.state_dir);
    let root = root_pkcs8(&paths)?;
    let own = Signer::load(&paths.signer_key)?;
    let lifetime = config.gateway.record_lifetime.as_secs();
    with_store!(config, |store| async move {
        let (_, state) = store.snapshot().await?;
        let target = state
            .signers
            .iter()
            .filter(|c| c.name == name)
            .max_by_key(|c| c.not_after)
            .cloned()
            .ok_or_else(|| GatewayError::operator(format!("no signer named {name}")))?;
        if target.key_id == own.key_id {
            return Err(GatewayError::operator(format!(
                "{name} is this gateway's own signer: revoke it from another gateway"
            )));
        }
        let resigned =
            resign_from(&store, &state.records, target.key_id, &own, now, lifetime).await?;
        let revoked = coord::sign_signer(
            target.key,
            &target.name,
            target.serial + 1,
            now.saturating_sub(1),
            &root,
        )
        .map_err(|e| GatewayError::operator(format!("signer certificate: {e}")))?;
        store.put_signer(revoked.clone()).await?;
        Ok::<_, GatewayError>(SignerRevoked {
            cert: revoked,
            resigned,
        })
    })
}

/// Re-sign, with `own`, every record `from` signed: same fields, next serial, fresh expiry.
async fn resign_from<S: Store>(
    store: &S,
    records: &[coord::NodeRecord],
    from: KeyId,
    own: &Signer,
    now: u64,
    lifetime: u64,
) -> Result<usize, GatewayError> {
    let mut done = 0;
    for record in records.iter().filter(|r| r.signer == from) {
        let mut fields = record.fields();
        fields.serial += 1;
        fields.not_after = now + lifetime;
        let signed = coord::sign_record(fields, &own.pkcs8)
            .map_err(|e| GatewayError::operator(format!("re-signing {}: {e}", record.node_id)))?;
        store.put_record(signed).await?;
        done += 1;
    }
    Ok(done)
}

/// `gateway status`: the store, what it holds, its members and the gateways alive.
#[derive(Debug, Serialize)]
pub struct StatusDoc {
    pub store: StoreDoc,
    pub store_id: String,
    /// The store's head revision (etcd's revision with etcd).
    pub rev: u64,
    pub writable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub nodes: usize,
    pub signers: Vec<SignerDoc>,
    /// etcd's members and endpoint health (etcd only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<serde_json::Value>,
    /// Gateways registered under a live lease (etcd only; sqlite serves one gateway).
    pub gateways: Vec<GatewayDoc>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoreDoc {
    Sqlite {
        path: PathBuf,
    },
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

#[derive(Debug, Serialize)]
pub struct SignerDoc {
    pub name: String,
    pub key_id: String,
    pub serial: u64,
    pub not_after: u64,
    pub revoked: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayDoc {
    pub node_id: NodeId,
    pub name: String,
    pub url: String,
    pub started_at: u64,
    pub version: String,
}

pub fn status(config: &Config, now: u64) -> Result<StatusDoc, GatewayError> {
    let store_doc = match &config.gateway.store {
        GatewayStore::Sqlite => StoreDoc::Sqlite {
            path: Paths::new(&config.node.state_dir).store,
        },
        GatewayStore::Etcd(etcd) => StoreDoc::Etcd {
            endpoints: etcd.endpoints.clone(),
            prefix: etcd.prefix.clone(),
        },
    };
    let (store_id, rev, state, nodes, extra) = with_store!(config, |store| async move {
        let (rev, state) = store.snapshot().await?;
        let nodes = store.nodes().await?.iter().filter(|n| !n.revoked).count();
        let extra = store_extra(&store).await;
        Ok::<_, GatewayError>((store.store_id(), rev, state, nodes, extra))
    })?;
    let signers = state
        .signers
        .iter()
        .map(|c| SignerDoc {
            name: c.name.clone(),
            key_id: c.key_id.to_string(),
            serial: c.serial,
            not_after: c.not_after,
            revoked: c.not_after <= now,
        })
        .collect();
    Ok(StatusDoc {
        store: store_doc,
        store_id: format!("{store_id:016x}"),
        rev,
        writable: extra.writable,
        reason: extra.reason,
        nodes,
        signers,
        cluster: extra.cluster,
        gateways: extra.gateways,
    })
}

/// What only some stores can tell: cluster health and presence.
pub struct StoreExtra {
    pub writable: bool,
    pub reason: Option<String>,
    pub cluster: Option<serde_json::Value>,
    pub gateways: Vec<GatewayDoc>,
}

/// Presence and cluster health, for the stores that have them (etcd); sqlite is writable
/// while it opens and has no presence.
pub trait StoreInfo {
    fn extra(&self) -> impl Future<Output = StoreExtra> + Send;
}

async fn store_extra<S: StoreInfo>(store: &S) -> StoreExtra {
    store.extra().await
}

impl StoreInfo for super::SqliteStore {
    async fn extra(&self) -> StoreExtra {
        StoreExtra {
            writable: true,
            reason: None,
            cluster: None,
            gateways: Vec::new(),
        }
    }
}

#[cfg(feature = "store-etcd")]
impl StoreInfo for super::etcd::EtcdStore {
    async fn extra(&self) -> StoreExtra {
        let cluster = self.cluster().await;
        let mut gateways: Vec<GatewayDoc> = self
            .gateways_alive()
            .into_iter()
            .map(|p| GatewayDoc {
                node_id: p.node_id,
                name: p.name,
                url: p.url,
                started_at: p.started_at,
                version: p.version,
            })
            .collect();
        gateways.sort_by(|a, b| (a.started_at, &a.url).cmp(&(b.started_at, &b.url)));
        StoreExtra {
            writable: cluster.writable,
            reason: cluster.reason.clone(),
            cluster: serde_json::to_value(&cluster).ok(),
            gateways,
        }
    }
}
