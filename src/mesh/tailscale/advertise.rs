//! Tailscale Services the way `tailscale serve --service` sets them up: the name in
//! `AdvertiseServices` and a `Services` entry in the serve config, withdrawn by draining first.
//! Which services clawnode owns is kept in the state directory, so nothing else is touched.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};

use super::localapi::{LocalApi, LocalApiError};
use super::provider::TailscaleMesh;
use super::types::{Prefs, Status};
use crate::core::backoff::Backoff;
use crate::core::serve_config::{self, Mode, WantedService};
use crate::mesh::{MeshError, ServiceAd};
use crate::state;

/// Concurrent serve-config writers are rare; a few quick retries settle them.
const SERVE_RETRIES: u32 = 6;
const OWNED_FILE: &str = crate::state::TAILSCALE_SERVICES;

impl TailscaleMesh {
    async fn publish_inner(&mut self, services: &[ServiceAd]) -> Result<(), MeshError> {
        let api = self.api()?.clone();
        let wanted: Vec<WantedService> = services.iter().map(wanted).collect();
        let owned = self.owned.clone().unwrap_or_default();
        if wanted.is_empty() && owned.is_empty() {
            return Ok(());
        }
        if !wanted.is_empty() {
            let status: Status = api.read("/localapi/v0/status?peers=false").await?;
            if status.self_node.tags.is_empty() {
                return Err(MeshError::needs_operator(
                    "service hosts must be tagged nodes: set [network.tailscale] tags (and allow them in the tailnet policy)",
                ));
            }
        }
        // Recorded first, old and new together: a crash or failure from here on leaves
        // nothing advertised that clawnode does not know it owns, so a later stop withdraws it.
        let claimed: BTreeSet<String> = owned
            .iter()
            .cloned()
            .chain(wanted.iter().map(WantedService::name))
            .collect();
        if Some(&claimed) != self.owned.as_ref() {
            self.save_owned(claimed)?;
        }
        // Withdrawals drain before their serve entries go; additions get their serve entry
        // before they are advertised, so control never routes to a name with no handler.
        // Each step writes only when it changes something.
        let wanted_names: BTreeSet<String> = wanted.iter().map(WantedService::name).collect();
        let unwanted: BTreeSet<String> = owned.difference(&wanted_names).cloned().collect();
        edit_advertised(&api, |current| serve_config::drain(current, &unwanted)).await?;
        let suffix = self.suffix.clone();
        let new_owned = edit_serve(&api, |current| {
            serve_config::reconcile(current, &owned, &wanted, &suffix)
        })
        .await?;
        edit_advertised(&api, |current| {
            serve_config::advertise(current, &owned, &wanted)
        })
        .await?;
        if Some(&new_owned) != self.owned.as_ref() {
            self.save_owned(new_owned)?;
        }
        if self.published.is_none() && !wanted.is_empty() {
            // The next join reads approval and reports what control has not approved yet.
            self.hooks.recheck.request("services published");
        }
        self.published = Some(services.to_vec());
        Ok(())
    }

    /// Publish and record the outcome for the status API.
    pub(super) async fn publish_recorded(
        &mut self,
        services: &[ServiceAd],
    ) -> Result<(), MeshError> {
        let result = self.publish_inner(services).await;
        let error = result.as_ref().err().map(ToString::to_string);
        self.live.update(|t| {
            t.services = services.to_vec();
            t.publish_error = error;
        });
        result
    }

    /// A problem line per published service that control has not approved yet.
    pub(super) fn awaiting_approval(&self, status: &Status) -> Vec<String> {
        let approved = status.approved_services();
        self.published
            .iter()
            .flatten()
            .filter(|ad| !approved.contains_key(&format!("svc:{}", ad.name)))
            .map(|ad| {
                format!(
                    "svc:{} is advertised and awaiting approval by the tailnet (autoApprovers.services or an admin)",
                    ad.name
                )
            })
            .collect()
    }

    pub(super) async fn withdraw_inner(&mut self) -> Result<(), MeshError> {
        let Some(api) = self.api.clone() else {
            return Ok(());
        };
        let owned = self.owned.clone().unwrap_or_default();
        if owned.is_empty() {
            return Ok(());
        }
        // Drain first, so control stops sending new flows, then clear the entries.
        edit_advertised(&api, |current| serve_config::drain(current, &owned)).await?;
        edit_serve(&api, |current| {
            (serve_config::withdraw(current, &owned), BTreeSet::new())
        })
        .await?;
        self.save_owned(BTreeSet::new())?;
        self.published = None;
        Ok(())
    }

    fn save_owned(&mut self, owned: BTreeSet<String>) -> Result<(), MeshError> {
        let path = self.state_dir.join(OWNED_FILE);
        let body = serde_json::to_vec(&owned)
            .map_err(|e| MeshError::transient(format!("cannot encode {OWNED_FILE}: {e}")))?;
        state::ensure_private_dir(&self.state_dir)
            .and_then(|()| state::write_atomic(&path, &body, 0o600))
            .map_err(|e| MeshError::transient(e.to_string()))?;
        self.owned = Some(owned);
        Ok(())
    }
}

/// The services clawnode advertised before, as recorded in the state directory.
pub(super) fn load_owned(state_dir: &Path) -> BTreeSet<String> {
    std::fs::read(state_dir.join(OWNED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

async fn edit_advertised(
    api: &LocalApi,
    edit: impl Fn(&[String]) -> Vec<String>,
) -> Result<(), MeshError> {
    let prefs: Prefs = api.read("/localapi/v0/prefs").await?;
    let current = prefs.services();
    let next = edit(current);
    if next == current {
        return Ok(());
    }
    let body = json!({ "AdvertiseServices": next, "AdvertiseServicesSet": true });
    api.send_json(Method::PATCH, "/localapi/v0/prefs", &body)
        .await?;
    Ok(())
}

/// Read-modify-write of the serve config with If-Match, retried when another writer got in
/// between (412). The config stays a `Value`: entries clawnode does not own pass unchanged.
async fn edit_serve(
    api: &LocalApi,
    edit: impl Fn(&Value) -> (Value, BTreeSet<String>),
) -> Result<BTreeSet<String>, MeshError> {
    let backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    for attempt in 1..=SERVE_RETRIES {
        let reply = api.get("/localapi/v0/serve-config").await?;
        let current: Value = reply.json("serve-config")?;
        let (next, owned) = edit(&current);
        if next == current || (current.is_null() && next == json!({})) {
            return Ok(owned);
        }
        let etag = reply.etag.unwrap_or_default();
        let body = serde_json::to_vec(&next)
            .map_err(|e| MeshError::transient(format!("cannot encode the serve config: {e}")))?;
        match api
            .call(
                Method::POST,
                "/localapi/v0/serve-config",
                Some(body),
                Some(&etag),
            )
            .await
        {
            Ok(_) => return Ok(owned),
            Err(LocalApiError::EtagMismatch { .. }) => {
                tracing::info!(
                    component = "mesh",
                    attempt,
                    "serve config changed underneath; retrying"
                );
                tokio::time::sleep(backoff.delay(attempt, fastrand::u32(..))).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(MeshError::transient(format!(
        "the serve config kept changing underneath; gave up after {SERVE_RETRIES} attempts"
    )))
}

fn wanted(ad: &ServiceAd) -> WantedService {
    let mode = match ad.protocol.as_str() {
        "https" => Mode::Http { tls: true },
        "http" => Mode::Http { tls: false },
        _ => Mode::Tcp,
    };
    WantedService {
        label: ad.name.clone(),
        port: ad.port,
        mode,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_captured_node_level_serve_entry_survives_our_service_coming_and_going() {
        let serve: Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/tailscale/serve-config-node-tcpforward.json"
        ))
        .expect("fixture parses");
        let owned = BTreeSet::new();
        let (with_ours, owned) = serve_config::reconcile(
            &serve,
            &owned,
            &[WantedService {
                label: "molt-provider".into(),
                port: 8443,
                mode: Mode::Tcp,
            }],
            "tail1.ts.net",
        );
        assert_eq!(
            serde_json::to_string(&serve_config::withdraw(&with_ours, &owned)).ok(),
            serde_json::to_string(&serve).ok(),
            "the captured node-level entry survives byte for byte"
        );
    }

    #[test]
    fn service_protocols_map_to_serve_modes() {
        let ad = |protocol: &str| ServiceAd {
            name: "molt-provider".into(),
            port: 8443,
            protocol: protocol.into(),
        };
        assert_eq!(wanted(&ad("https")).mode, Mode::Http { tls: true });
        assert_eq!(wanted(&ad("http")).mode, Mode::Http { tls: false });
        assert_eq!(wanted(&ad("tcp")).mode, Mode::Tcp);
    }
}
