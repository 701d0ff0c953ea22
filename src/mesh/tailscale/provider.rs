//! The `tailscale` mesh provider: bring-up through `start` only when needed, Tailscale
//! Services advertised the way `tailscale serve --service` does it, a drain-then-clear
//! withdrawal, and a bus watcher that asks for a recheck whenever tailscaled changes state or
//! comes back after a restart.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::certs::{self, CertKeeper};
use super::localapi::{LocalApi, LocalApiError, Version};
use super::{authkey, status, strings};
use crate::config::Config;
use crate::core::backoff::Backoff;
use crate::core::serve_config::{self, Mode, WantedService};
use crate::mesh::{
    BoxFuture, Callers, Hooks, Joined, MeshError, MeshProvider, MeshStatus, NodeInfoSpot,
    ServiceAd, Voucher,
};
use crate::state;

/// How long a bring-up waits on the bus for Running.
const LOGIN_WAIT: Duration = Duration::from_secs(60);
/// Concurrent serve-config writers are rare; a few quick retries settle them.
const SERVE_RETRIES: u32 = 6;
const OWNED_FILE: &str = "tailscale-services.json";

pub struct TailscaleMesh {
    hooks: Hooks,
    live: status::LiveTailscale,
    api: Option<LocalApi>,
    owned: Option<BTreeSet<String>>,
    state_dir: PathBuf,
    suffix: String,
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// What was last published, re-applied on every join: tailscaled may have restarted and
    /// lost it, and the check costs two reads when nothing changed.
    published: Option<Vec<ServiceAd>>,
    certs: Option<CertKeeper>,
    /// A key resolved for a login that has not completed yet.
    pending_key: Option<Zeroizing<String>>,
}

impl TailscaleMesh {
    pub fn new(hooks: Hooks) -> Self {
        Self {
            hooks,
            live: status::LiveTailscale::default(),
            api: None,
            owned: None,
            state_dir: PathBuf::new(),
            suffix: String::new(),
            watcher: None,
            published: None,
            certs: None,
            pending_key: None,
        }
    }

    fn api(&self) -> Result<&LocalApi, MeshError> {
        self.api
            .as_ref()
            .ok_or_else(|| MeshError::transient("tailscale provider used before join"))
    }

    async fn join_inner(&mut self, config: &Config) -> Result<Joined, MeshError> {
        let ts = &config.network.tailscale;
        if self.api.as_ref().is_none_or(|a| a.socket() != ts.socket) {
            self.api = Some(LocalApi::new(&ts.socket));
            self.certs = None;
        }
        self.state_dir = config.node.state_dir.clone();
        if self.owned.is_none() {
            self.owned = Some(load_owned(&self.state_dir));
        }
        let api = self.api()?.clone();
        self.ensure_watcher(&api);

        let reply = api
            .get("/localapi/v0/status?peers=false")
            .await
            .map_err(failed)?;
        let version = reply.version;
        let status: Value = reply.json("status").map_err(failed)?;
        if !config.services.is_empty()
            && let Some(v) = version
            && v < Version::SERVICES
        {
            return Err(MeshError::transient(format!(
                "tailscaled {v} is too old for Tailscale Services (1.86 or newer is needed)"
            )));
        }
        let hostname = format!("{}-{}", ts.hostname_prefix, config.node.name);
        let tags: Vec<String> = ts.tags.iter().map(|t| t.to_string()).collect();
        let prefs: Value = read(&api, "/localapi/v0/prefs").await?;
        let running = status["BackendState"] == "Running";
        let tags_match = strings(&prefs["AdvertiseTags"]) == tags;
        if running && tags_match {
            if prefs["Hostname"] != json!(hostname) {
                // A rename does not need `start`, which would tear down the control connection.
                let body = json!({ "Hostname": hostname, "HostnameSet": true });
                patch_prefs(&api, &body).await?;
            }
        } else {
            self.bring_up(&api, config, &status, prefs, &hostname, &tags)
                .await?;
        }

        let status: Value = read(&api, "/localapi/v0/status?peers=false").await?;
        match status["BackendState"].as_str() {
            Some("Running") => {}
            Some("NeedsMachineAuth") => {
                return Err(MeshError::transient(
                    "waiting for admin approval of this device in the Tailscale admin console",
                ));
            }
            Some(other) => {
                return Err(MeshError::transient(format!(
                    "tailscaled is {other}, not Running"
                )));
            }
            None => {
                return Err(MeshError::transient(
                    "tailscaled status has no BackendState",
                ));
            }
        }
        let tailnet = &status["CurrentTailnet"];
        self.suffix = tailnet["MagicDNSSuffix"].as_str().unwrap_or("").to_string();
        if let Some(want) = &ts.tailnet {
            let name = tailnet["Name"].as_str().unwrap_or("");
            if name != want && self.suffix != *want {
                return Err(MeshError::transient(format!(
                    "this device is in tailnet {name:?} ({}), but the config expects {want:?}; advertising nothing",
                    self.suffix
                )));
            }
        }
        self.live.attach(api.clone());
        self.hooks.live.set(Some(Arc::new(self.live.clone())));
        let keeper = self
            .certs
            .get_or_insert_with(|| CertKeeper::start(api.clone(), self.live.clone()));
        keeper.want(certs::Wanted {
            labels: config
                .services
                .iter()
                .filter(|(_, spec)| spec.tls_cert)
                .map(|(name, _)| name.to_string())
                .collect(),
            dir: config.node.state_dir.join("certs"),
        });
        if let Some(services) = self.published.clone() {
            self.publish_recorded(&services).await?;
        }
        let ipv4 = strings(&status["TailscaleIPs"])
            .into_iter()
            .find_map(|ip| ip.parse::<Ipv4Addr>().ok());
        let mut problems = self.awaiting_approval(&status);
        let node_info = ipv4.and_then(|ip| {
            node_info_spot(config, &status, ip, &api)
                .map_err(|problem| problems.push(problem))
                .ok()
        });
        Ok(Joined {
            status: MeshStatus {
                provider: "tailscale".into(),
                interface: node_info.as_ref().map(|spot| spot.interface.clone()),
                address: ipv4.map(|ip| ip.to_string()),
                peers: 0,
                problems,
            },
            node_info,
        })
    }

    /// `start` with complete prefs (keeping AdvertiseServices), `login-interactive` for a node
    /// without a key, then wait on the bus for Running.
    async fn bring_up(
        &mut self,
        api: &LocalApi,
        config: &Config,
        status: &Value,
        mut prefs: Value,
        hostname: &str,
        tags: &[String],
    ) -> Result<(), MeshError> {
        let ts = &config.network.tailscale;
        let have_key = status["HaveNodeKey"].as_bool().unwrap_or(false);
        let control = ts
            .control_url
            .clone()
            .or_else(|| {
                prefs["ControlURL"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| authkey::DEFAULT_CONTROL_URL.into());
        if ts.auth.is_none() && !have_key {
            return Err(MeshError::transient(
                "tailscaled is not logged in and no auth method is configured (set auth_key_file, auth_key_env, auth_key or workload_identity under [network.tailscale])",
            ));
        }
        // A node that holds a valid key restarts without a new one: minting or reusing a key
        // there would re-register it. NeedsLogin with a key means that key expired.
        let needs_auth = !have_key || status["BackendState"] == "NeedsLogin";
        prefs["ControlURL"] = json!(control);
        prefs["WantRunning"] = json!(true);
        prefs["Hostname"] = json!(hostname);
        prefs["AdvertiseTags"] = json!(tags);
        // Config is ignored on input; AdvertiseServices stays as it is (start replaces prefs
        // wholesale, and leaving it out would un-advertise every service).
        if let Some(map) = prefs.as_object_mut() {
            map.remove("Config");
        }
        // tailscaled answers 200 with {"Error"} when it would refuse these prefs.
        let verdict: Value = api
            .call(
                Method::POST,
                "/localapi/v0/check-prefs",
                Some(prefs.to_string().into_bytes()),
                None,
            )
            .await
            .map_err(failed)?
            .json("check-prefs")
            .map_err(failed)?;
        if let Some(error) = verdict["Error"].as_str().filter(|e| !e.is_empty()) {
            return Err(MeshError::transient(format!(
                "tailscaled refuses the prefs clawnode would set: {error}"
            )));
        }
        // Only now a key: a refusal above must not cost a minted key per retry.
        // A key minted for an attempt that failed later (start refused, no Running in time) is
        // kept for the next attempt: it was not used, and minting costs a key each time.
        let auth_key = match (needs_auth, self.pending_key.take()) {
            (false, _) => None,
            (true, Some(kept)) => Some(kept),
            (true, None) => authkey::resolve(ts.auth.as_ref(), Some(&control), tags)
                .await
                .map_err(failed)?,
        };
        self.pending_key = auth_key.clone();
        let mut bus = api.watch_bus(2).await.map_err(failed)?;
        let options = json!({ "AuthKey": auth_key.as_deref().map_or("", |k| k.as_str()), "UpdatePrefs": prefs });
        let body = Zeroizing::new(options.to_string().into_bytes());
        api.call(
            Method::POST,
            "/localapi/v0/start",
            Some(body.to_vec()),
            None,
        )
        .await
        .map_err(failed)?;
        if !have_key {
            api.call(Method::POST, "/localapi/v0/login-interactive", None, None)
                .await
                .map_err(failed)?;
        }
        tracing::info!(
            component = "mesh",
            hostname,
            "asked tailscaled to log in; waiting for Running"
        );
        let wait = async {
            let mut lines = Ndjson::default();
            while let Some(frame) = bus.frame().await {
                let Ok(frame) = frame else { break };
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                for notify in lines.push(data) {
                    if let Some(message) = notify["ErrMessage"].as_str() {
                        return Err(MeshError::transient(format!("tailscaled: {message}")));
                    }
                    if notify["BrowseToURL"]
                        .as_str()
                        .is_some_and(|u| !u.is_empty())
                    {
                        // The URL itself stays out: whoever opens it can claim the node.
                        return Err(MeshError::transient(
                            "tailscaled wants an interactive login: the auth key was missing or rejected (`tailscale status` shows the login URL to root)",
                        ));
                    }
                    match notify["State"].as_u64() {
                        Some(6) | Some(3) => return Ok(()),
                        _ => {}
                    }
                }
            }
            Err(MeshError::transient(
                "tailscaled closed the IPN bus during login",
            ))
        };
        tokio::time::timeout(LOGIN_WAIT, wait).await.map_err(|_| {
            MeshError::transient(format!(
                "tailscaled did not reach Running within {} s",
                LOGIN_WAIT.as_secs()
            ))
        })??;
        self.pending_key = None;
        Ok(())
    }

    /// A task that follows the IPN bus and asks for a recheck whenever the state changes or
    /// the bus comes back after tailscaled went away; it reconnects with capped, jittered
    /// backoff and never gives up.
    fn ensure_watcher(&mut self, api: &LocalApi) {
        if self.watcher.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        let api = api.clone();
        let recheck = self.hooks.recheck.clone();
        self.watcher = Some(tokio::spawn(async move {
            let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            let mut failures = 0u32;
            let mut last_state: Option<u64> = None;
            loop {
                match api.watch_bus(2).await {
                    Ok(mut body) => {
                        if failures > 0 {
                            recheck.request("tailscaled is back");
                        }
                        let mut lines = Ndjson::default();
                        while let Some(Ok(frame)) = body.frame().await {
                            let Some(data) = frame.data_ref() else {
                                continue;
                            };
                            for notify in lines.push(data) {
                                if let Some(state) = notify["State"].as_u64()
                                    && last_state.replace(state).is_some_and(|old| old != state)
                                {
                                    recheck.request(format!("tailscaled state {state}"));
                                }
                                // Approval, tags and addresses change with the self node.
                                if !notify["SelfChange"].is_null() {
                                    recheck.request("self node changed");
                                }
                            }
                        }
                        tracing::warn!(
                            component = "mesh",
                            "tailscaled IPN bus closed; reconnecting"
                        );
                        failures = 1;
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        tracing::debug!(component = "mesh", %error, "IPN bus unavailable");
                    }
                }
                tokio::time::sleep(backoff.delay(failures, fastrand::u32(..))).await;
            }
        }));
    }

    async fn publish_inner(&mut self, services: &[ServiceAd]) -> Result<(), MeshError> {
        let api = self.api()?.clone();
        let wanted: Vec<WantedService> = services.iter().map(wanted).collect();
        let owned = self.owned.clone().unwrap_or_default();
        if wanted.is_empty() && owned.is_empty() {
            return Ok(());
        }
        if !wanted.is_empty() {
            let status: Value = read(&api, "/localapi/v0/status?peers=false").await?;
            if strings(&status["Self"]["Tags"]).is_empty() {
                return Err(MeshError::transient(
                    "service hosts must be tagged nodes: set [network.tailscale] tags (and allow them in the tailnet policy)",
                ));
            }
        }
        self.edit_advertised(&api, |current| {
            serve_config::advertise(current, &owned, &wanted)
        })
        .await?;
        let suffix = self.suffix.clone();
        let new_owned = self
            .edit_serve(&api, |current| {
                serve_config::reconcile(current, &owned, &wanted, &suffix)
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
    async fn publish_recorded(&mut self, services: &[ServiceAd]) -> Result<(), MeshError> {
        let result = self.publish_inner(services).await;
        let error = result.as_ref().err().map(ToString::to_string);
        self.live.update(|t| {
            t.services = services.to_vec();
            t.publish_error = error;
        });
        result
    }

    /// A problem line per published service that control has not approved yet.
    fn awaiting_approval(&self, status: &Value) -> Vec<String> {
        let approved = status::approved_services(status);
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

    async fn withdraw_inner(&mut self) -> Result<(), MeshError> {
        let Some(api) = self.api.clone() else {
            return Ok(());
        };
        let owned = self.owned.clone().unwrap_or_default();
        if owned.is_empty() {
            return Ok(());
        }
        // Drain first, so control stops sending new flows, then clear the entries.
        self.edit_advertised(&api, |current| serve_config::drain(current, &owned))
            .await?;
        self.edit_serve(&api, |current| {
            (serve_config::withdraw(current, &owned), BTreeSet::new())
        })
        .await?;
        self.save_owned(BTreeSet::new())?;
        self.published = None;
        Ok(())
    }

    async fn edit_advertised(
        &self,
        api: &LocalApi,
        edit: impl Fn(&[String]) -> Vec<String>,
    ) -> Result<(), MeshError> {
        let prefs: Value = read(api, "/localapi/v0/prefs").await?;
        let current = strings(&prefs["AdvertiseServices"]);
        let next = edit(&current);
        if next == current {
            return Ok(());
        }
        let body = json!({ "AdvertiseServices": next, "AdvertiseServicesSet": true });
        patch_prefs(api, &body).await?;
        Ok(())
    }

    /// Read-modify-write of the serve config with If-Match, retried when another writer got
    /// in between (412).
    async fn edit_serve(
        &self,
        api: &LocalApi,
        edit: impl Fn(&Value) -> (Value, BTreeSet<String>),
    ) -> Result<BTreeSet<String>, MeshError> {
        let backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        for attempt in 1..=SERVE_RETRIES {
            let reply = api.get("/localapi/v0/serve-config").await.map_err(failed)?;
            let current: Value = reply.json("serve-config").map_err(failed)?;
            let (next, owned) = edit(&current);
            if next == current || (current.is_null() && next == json!({})) {
                return Ok(owned);
            }
            let etag = reply.etag.unwrap_or_default();
            let body = serde_json::to_vec(&next).map_err(failed)?;
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
                Err(error) => return Err(failed(error)),
            }
        }
        Err(MeshError::transient(format!(
            "the serve config kept changing underneath; gave up after {SERVE_RETRIES} attempts"
        )))
    }

    fn save_owned(&mut self, owned: BTreeSet<String>) -> Result<(), MeshError> {
        let path = self.state_dir.join(OWNED_FILE);
        let body = serde_json::to_vec(&owned).map_err(failed)?;
        state::ensure_private_dir(&self.state_dir).map_err(failed)?;
        state::write_atomic(&path, &body, 0o600).map_err(failed)?;
        self.owned = Some(owned);
        Ok(())
    }
}

impl MeshProvider for TailscaleMesh {
    fn join<'a>(&'a mut self, config: &'a Config) -> BoxFuture<'a, Result<Joined, MeshError>> {
        Box::pin(self.join_inner(config))
    }

    fn publish<'a>(
        &'a mut self,
        services: &'a [ServiceAd],
    ) -> BoxFuture<'a, Result<(), MeshError>> {
        Box::pin(self.publish_recorded(services))
    }

    fn withdraw(&mut self) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(self.withdraw_inner())
    }

    fn leave(&mut self) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move {
            // The node stays logged in; only clawnode's own watcher stops.
            if let Some(watcher) = self.watcher.take() {
                watcher.abort();
            }
            self.certs = None;
            self.hooks.live.set(None);
            Ok(())
        })
    }
}

/// `GET /v1/node` on the Tailscale IPv4, bound to the interface that holds it, for tailnet
/// nodes only; or the problem that keeps it from being served (it does not stop the join).
fn node_info_spot(
    config: &Config,
    status: &Value,
    ip: Ipv4Addr,
    api: &LocalApi,
) -> Result<NodeInfoSpot, String> {
    let Some(interface) = crate::mesh::interface_with(IpAddr::V4(ip)) else {
        return Err(format!(
            "node-info endpoint not served: no interface holds {ip} (tailscaled in userspace-networking mode?)"
        ));
    };
    Ok(NodeInfoSpot {
        interface,
        listen: SocketAddr::new(IpAddr::V4(ip), config.network.tailscale.node_info_port),
        public_key: status["Self"]["PublicKey"].as_str().unwrap_or("").into(),
        callers: Callers::Vouched(Arc::new(Whois(api.clone()))),
        essential: false,
    })
}

/// tailscaled knows every tailnet node by its address.
struct Whois(LocalApi);

impl Voucher for Whois {
    fn vouches_for(&self, peer: SocketAddr) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            self.0
                .get(&format!("/localapi/v0/whois?addr={peer}"))
                .await
                .is_ok()
        })
    }
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

fn load_owned(state_dir: &Path) -> BTreeSet<String> {
    std::fs::read(state_dir.join(OWNED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// GET a LocalAPI path and decode its JSON.
async fn read(api: &LocalApi, path: &str) -> Result<Value, MeshError> {
    api.get(path)
        .await
        .map_err(failed)?
        .json(path)
        .map_err(failed)
}

/// `PATCH prefs` with a MaskedPrefs body.
async fn patch_prefs(api: &LocalApi, masked: &Value) -> Result<(), MeshError> {
    let body = masked.to_string().into_bytes();
    api.call(Method::PATCH, "/localapi/v0/prefs", Some(body), None)
        .await
        .map_err(failed)?;
    Ok(())
}

/// Splits the IPN bus's byte stream into its JSON objects, one per line; a line may arrive in
/// several chunks.
#[derive(Default)]
struct Ndjson(Vec<u8>);

impl Ndjson {
    fn push(&mut self, data: &[u8]) -> Vec<Value> {
        self.0.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(pos) = self.0.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=pos).collect();
            if let Ok(value) = serde_json::from_slice(&line) {
                out.push(value);
            }
        }
        out
    }
}

fn failed(error: impl std::fmt::Display) -> MeshError {
    let text = error.to_string();
    if text.contains("config file is locked") {
        // Retrying cannot help, and overriding the operator's file would be wrong.
        return MeshError::transient(format!(
            "tailscaled runs with --config, which locks its settings; clawnode will not fight the config file: set hostname, tags and services there, or run tailscaled without --config ({text})"
        ));
    }
    MeshError::transient(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_lines_split_across_chunks_are_joined_and_states_are_integers() {
        let mut lines = Ndjson::default();
        assert!(lines.push(b"{\"Version\":\"1.102.2\",\"Sta").is_empty());
        let got = lines.push(b"te\":6}\n{\"State\":3}\n{\"Eng");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["State"].as_u64(), Some(6));
        assert_eq!(got[1]["State"].as_u64(), Some(3));
    }

    #[test]
    fn the_real_captures_parse_with_their_unknown_fields_and_nulls() {
        let status: Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/tailscale/status-scrubbed-linux-1.102.2.json"
        ))
        .unwrap();
        assert_eq!(status["BackendState"], "Running");
        assert!(!strings(&status["TailscaleIPs"]).is_empty());
        assert!(
            strings(&status["Self"]["Tags"]).is_empty(),
            "absent tags read as none"
        );
        assert!(
            status["CurrentTailnet"]["Name"].as_str().is_none(),
            "absent tailnet"
        );
        let old: Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/tailscale/status-trimmed-1.76.6.json"
        ))
        .unwrap();
        assert!(strings(&old["Self"]["Tags"]).is_empty(), "no Self at all");
        let prefs: Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/tailscale/prefs-partial.json"
        ))
        .unwrap();
        assert!(strings(&prefs["AdvertiseTags"]).is_empty(), "null tags");
        assert!(
            strings(&prefs["AdvertiseServices"]).is_empty(),
            "missing key"
        );
        let serve: Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/tailscale/serve-config-node-tcpforward.json"
        ))
        .unwrap();
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
            serde_json::to_string(&serve_config::withdraw(&with_ours, &owned)).unwrap(),
            serde_json::to_string(&serve).unwrap(),
            "the captured node-level entry survives byte for byte"
        );
    }

    #[test]
    fn nulls_where_lists_are_expected_read_as_empty() {
        assert!(strings(&Value::Null).is_empty());
        assert_eq!(strings(&json!(["tag:a", null, 3])), vec!["tag:a"]);
    }
}
