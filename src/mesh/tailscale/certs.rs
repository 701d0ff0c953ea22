//! TLS certificates for services with `tls_cert = true`: once control lists the service's
//! MagicDNS name in `CertDomains` (it does after approving the host), clawnode fetches the pair
//! through `cert/<name>?type=pair` and writes key and chain into the state dir.
//!
//! Renewal is tailscaled's: `min_validity` makes it renew synchronously when the cached cert
//! would expire sooner, so a twice-daily fetch keeps the files fresh without parsing X.509.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::Notify;
use zeroize::Zeroizing;

use super::localapi::{LocalApi, LocalApiError};
use super::status::{CertDoc, LiveTailscale};
use super::strings;
use crate::state;

/// A cert is renewed when it would expire within this window.
pub const MIN_VALIDITY: &str = "240h";
const REFRESH: Duration = Duration::from_secs(12 * 3600);
const RETRY: Duration = Duration::from_secs(300);
/// The first issuance runs an ACME DNS-01 challenge through control: tens of seconds.
const FETCH_TIMEOUT: Duration = Duration::from_secs(90);

/// What the keeper should hold certs for.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub labels: Vec<String>,
    pub dir: PathBuf,
}

/// A background task that fetches and renews certificates; `want` nudges it.
pub struct CertKeeper {
    wanted: Arc<Mutex<Wanted>>,
    nudge: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl CertKeeper {
    pub fn start(api: LocalApi, live: LiveTailscale) -> CertKeeper {
        let wanted = Arc::new(Mutex::new(Wanted::default()));
        let nudge = Arc::new(Notify::new());
        let task = tokio::spawn(run(
            api.with_timeout(FETCH_TIMEOUT),
            live,
            Arc::clone(&wanted),
            Arc::clone(&nudge),
        ));
        CertKeeper {
            wanted,
            nudge,
            task,
        }
    }

    /// Hold certs for these services; checks again now (approval may just have come).
    pub fn want(&self, wanted: Wanted) {
        *self.wanted.lock().unwrap_or_else(|p| p.into_inner()) = wanted;
        self.nudge.notify_one();
    }
}

impl Drop for CertKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Split a `type=pair` body: the private key PEM first, then the certificate chain.
pub fn split_pair(pair: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = pair.windows(4).position(|w| w == b"--\n-")? + 3;
    let (key, chain) = pair.split_at(at);
    let chain_text = String::from_utf8_lossy(chain);
    let key_text = String::from_utf8_lossy(key);
    if chain_text.contains(" PRIVATE KEY-----")
        || !key_text.contains(" PRIVATE KEY-----")
        || !chain_text.contains("-----BEGIN CERTIFICATE-----")
    {
        return None;
    }
    Some((key, chain))
}

/// Where a domain's files go.
pub fn paths(dir: &Path, domain: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{domain}.crt")),
        dir.join(format!("{domain}.key")),
    )
}

async fn run(api: LocalApi, live: LiveTailscale, wanted: Arc<Mutex<Wanted>>, nudge: Arc<Notify>) {
    let mut last = Wanted::default();
    let mut fetched: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let now = wanted.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if now != last {
            fetched.clear();
            last = now.clone();
        }
        let docs = refresh(&api, &now, &mut fetched).await;
        let all_ok = docs.values().all(|d| d.error.is_none());
        live.update(|t| t.certs = docs);
        let wait = if all_ok { REFRESH } else { RETRY };
        if now.labels.is_empty() {
            nudge.notified().await;
        } else {
            let _ = tokio::time::timeout(wait, nudge.notified()).await;
        }
    }
}

async fn refresh(
    api: &LocalApi,
    wanted: &Wanted,
    fetched: &mut BTreeMap<String, u64>,
) -> BTreeMap<String, CertDoc> {
    let mut docs = BTreeMap::new();
    if wanted.labels.is_empty() {
        return docs;
    }
    let status = match api.get("/localapi/v0/status?peers=false").await {
        Ok(reply) => reply.json::<Value>("status"),
        Err(error) => Err(error),
    };
    let status = match status {
        Ok(status) => status,
        Err(error) => {
            for label in &wanted.labels {
                docs.insert(label.clone(), failed("", error.to_string()));
            }
            return docs;
        }
    };
    let suffix = status["CurrentTailnet"]["MagicDNSSuffix"]
        .as_str()
        .unwrap_or("")
        .trim_matches('.')
        .to_string();
    let domains = strings(&status["CertDomains"]);
    for label in &wanted.labels {
        let domain = format!("{label}.{suffix}");
        let doc = if domains.is_empty() {
            failed(
                &domain,
                "HTTPS certificates are not enabled for this tailnet (admin console, DNS, HTTPS Certificates)".into(),
            )
        } else if !domains.contains(&domain) {
            CertDoc {
                domain,
                state: "waiting for the domain".into(),
                ..CertDoc::default()
            }
        } else {
            match fetch(api, &wanted.dir, &domain).await {
                Ok(changed) => {
                    if changed || !fetched.contains_key(&domain) {
                        fetched.insert(domain.clone(), unix_ms());
                    }
                    let (crt, key) = paths(&wanted.dir, &domain);
                    CertDoc {
                        state: "issued".into(),
                        cert_file: Some(crt.display().to_string()),
                        key_file: Some(key.display().to_string()),
                        fetched_unix_ms: fetched.get(&domain).copied(),
                        domain,
                        error: None,
                    }
                }
                Err(error) => failed(&domain, error),
            }
        };
        docs.insert(label.clone(), doc);
    }
    docs
}

/// Fetch and write one pair; `Ok(true)` when the files changed.
async fn fetch(api: &LocalApi, dir: &Path, domain: &str) -> Result<bool, String> {
    let path = format!("/localapi/v0/cert/{domain}?type=pair&min_validity={MIN_VALIDITY}");
    let reply = api.get(&path).await.map_err(|e| {
        if matches!(e, LocalApiError::RateLimited { .. }) {
            format!("{e} (Let's Encrypt rate limit)")
        } else {
            e.to_string()
        }
    })?;
    let body = Zeroizing::new(reply.body.to_vec());
    let (key, chain) = split_pair(&body)
        .ok_or_else(|| "tailscaled returned something other than a key and chain".to_string())?;
    let (crt_path, key_path) = paths(dir, domain);
    let same = std::fs::read(&crt_path).is_ok_and(|old| old == chain)
        && std::fs::read(&key_path).is_ok_and(|old| Zeroizing::new(old).as_slice() == key);
    if same {
        return Ok(false);
    }
    state::ensure_private_dir(dir).map_err(|e| e.to_string())?;
    // Key first: a reader that sees the new chain must find its key already there.
    state::write_atomic(&key_path, key, 0o600).map_err(|e| e.to_string())?;
    state::write_atomic(&crt_path, chain, 0o600).map_err(|e| e.to_string())?;
    tracing::info!(component = "mesh", domain, cert = %crt_path.display(), "wrote the TLS certificate from tailscaled");
    Ok(true)
}

fn failed(domain: &str, error: String) -> CertDoc {
    CertDoc {
        domain: domain.to_string(),
        state: "failed".into(),
        error: Some(error),
        ..CertDoc::default()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n";
    const CHAIN: &str = "-----BEGIN CERTIFICATE-----\nMII1\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nMII2\n-----END CERTIFICATE-----\n";

    #[test]
    fn a_pair_splits_into_key_then_chain() {
        let pair = format!("{KEY}{CHAIN}");
        let (key, chain) = split_pair(pair.as_bytes()).unwrap();
        assert_eq!(key, KEY.as_bytes());
        assert_eq!(chain, CHAIN.as_bytes());
    }

    #[test]
    fn a_pair_with_a_key_in_the_chain_or_no_key_is_refused() {
        assert!(split_pair(format!("{CHAIN}{KEY}").as_bytes()).is_none());
        assert!(split_pair(format!("{KEY}{KEY}").as_bytes()).is_none());
        assert!(split_pair(b"garbage").is_none());
    }
}
