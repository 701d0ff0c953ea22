//! What `/v1/status` and `clawnode status` show of the Tailscale side: identity, addresses,
//! tailnet, tags, per configured service whether control approved this host for it, the peer
//! relay, and which path each peer's traffic takes. Read live from tailscaled when asked, so
//! approval and paths show up without clawnode polling.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::localapi::{LocalApi, Version};
use super::types::{Prefs, Status};
use crate::core::tailscale_relay::{
    PathKind, classify, derp_hint, relay_available, summarize, summary_line,
};
pub use crate::mesh::live::{
    CertDoc, Owner, PathsDoc, PeerPathDoc, RelayDoc, TsServiceState, TsStatus,
};
use crate::mesh::{BoxFuture, LiveSource, LiveStatus, ServiceAd};

/// The daemon to read and what clawnode asked of it, set by the provider once it has joined,
/// and the last peer list read.
#[derive(Clone, Default)]
pub struct LiveTailscale {
    target: Arc<RwLock<Option<Target>>>,
    /// One peer-list read at a time, shared by the requests within `PEERS_FRESH` of it.
    peers: Arc<tokio::sync::Mutex<Option<PeersRead>>>,
}

/// A full status (with peers) and when it was read.
type PeersRead = (Instant, Arc<Status>);

#[derive(Clone)]
pub struct Target {
    pub api: LocalApi,
    pub services: Vec<ServiceAd>,
    /// Why the last publish failed, shown against every service.
    pub publish_error: Option<String>,
    /// Certificate state by service label.
    pub certs: BTreeMap<String, CertDoc>,
    /// `relay_server_port` as of the last join.
    pub relay_wanted: Option<u16>,
    /// Why the last join did not apply it.
    pub relay_problem: Option<String>,
}

/// Bounded so a hung tailscaled cannot hang `clawnode status`.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// The peer list costs about 1.1 KiB a peer to send and parse: a scrape and a `clawnode status`
/// close together share one read.
const PEERS_FRESH: Duration = Duration::from_secs(2);

impl LiveTailscale {
    pub fn set(&self, target: Option<Target>) {
        *self.target.write().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// Point at `api`, keeping what is already known (certificates, the last publish).
    pub fn attach(&self, api: LocalApi) {
        let mut slot = self.target.write().unwrap_or_else(|p| p.into_inner());
        match slot.as_mut() {
            Some(target) => target.api = api,
            None => {
                *slot = Some(Target {
                    api,
                    services: Vec::new(),
                    publish_error: None,
                    certs: BTreeMap::new(),
                    relay_wanted: None,
                    relay_problem: None,
                });
            }
        }
    }

    /// Change the target in place; nothing happens when none is set.
    pub fn update(&self, f: impl FnOnce(&mut Target)) {
        if let Some(target) = self
            .target
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            f(target);
        }
    }

    /// Read tailscaled now. `None` when the provider has not joined.
    pub async fn read(&self) -> Option<TsStatus> {
        let target = self
            .target
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let read = async {
            let reply = target.api.get("/localapi/v0/status?peers=false").await?;
            let version = reply.version.map(|v| v.to_string());
            let status: Status = reply.json("status")?;
            let prefs: Prefs = target.api.get("/localapi/v0/prefs").await?.json("prefs")?;
            let serve: Value = target
                .api
                .get("/localapi/v0/serve-config")
                .await?
                .json("serve-config")?;
            let whois = match status.tailscale_ips.first() {
                Some(ip) => target
                    .api
                    .get(&format!("/localapi/v0/whois?addr={ip}"))
                    .await
                    .and_then(|r| r.json::<Value>("whois"))
                    .ok(),
                None => None,
            };
            Ok::<_, super::localapi::LocalApiError>((version, status, prefs, serve, whois))
        };
        let mut doc = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok((version, status, prefs, serve, whois))) => {
                let mut doc = build(&status, &prefs, &serve, whois.as_ref(), &target);
                doc.daemon_version = version.or(doc.daemon_version);
                doc
            }
            Ok(Err(error)) => {
                return Some(TsStatus {
                    error: Some(error.to_string()),
                    ..TsStatus::default()
                });
            }
            Err(_) => {
                return Some(TsStatus {
                    error: Some(format!(
                        "tailscaled did not answer within {} s",
                        READ_TIMEOUT.as_secs()
                    )),
                    ..TsStatus::default()
                });
            }
        };
        // The peers on their own budget: a big tailnet costs its path hints, not the rest.
        let serving = doc.relay.as_ref().is_some_and(|r| r.state == "serving");
        match tokio::time::timeout(READ_TIMEOUT, self.peers(&target.api)).await {
            Ok(Ok(peers)) => doc.paths = paths_doc(&peers, serving),
            Ok(Err(error)) => doc.paths_error = Some(error),
            Err(_) => {
                doc.paths_error = Some(format!(
                    "tailscaled's peer list did not arrive within {} s",
                    READ_TIMEOUT.as_secs()
                ));
            }
        }
        Some(doc)
    }

    /// The full status, with peers, parsed off the runtime thread; shared while fresh.
    async fn peers(&self, api: &LocalApi) -> Result<Arc<Status>, String> {
        let mut last = self.peers.lock().await;
        if let Some((at, peers)) = last.as_ref()
            && at.elapsed() < PEERS_FRESH
        {
            return Ok(Arc::clone(peers));
        }
        let reply = api
            .get("/localapi/v0/status")
            .await
            .map_err(|e| e.to_string())?;
        let status = tokio::task::spawn_blocking(move || reply.json::<Status>("status"))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let status = Arc::new(status);
        *last = Some((Instant::now(), Arc::clone(&status)));
        Ok(status)
    }
}

impl LiveSource for LiveTailscale {
    fn read(&self) -> BoxFuture<'_, Option<LiveStatus>> {
        Box::pin(async move { LiveTailscale::read(self).await.map(LiveStatus::Tailscale) })
    }
}

/// The status document from what tailscaled said.
pub fn build(
    status: &Status,
    prefs: &Prefs,
    serve: &Value,
    whois: Option<&Value>,
    target: &Target,
) -> TsStatus {
    let me = &status.self_node;
    let text = |v: Option<&str>| v.filter(|s| !s.is_empty()).map(str::to_string);
    let approved = status.approved_services();
    let advertised = prefs.services();
    let services = target
        .services
        .iter()
        .map(|ad| {
            let name = format!("svc:{}", ad.name);
            let in_prefs = advertised.contains(&name);
            let in_serve = !serve["Services"][&name].is_null();
            let vips = approved.get(&name).cloned();
            let (state, reason) = match (&target.publish_error, in_prefs && in_serve, &vips) {
                (Some(error), _, _) => ("failed", Some(error.clone())),
                (None, false, _) => ("not advertised", None),
                (None, true, Some(_)) => ("approved", None),
                (None, true, None) => (
                    "awaiting approval",
                    Some(
                        "an admin must approve it, or the tailnet policy must list this node's tag in autoApprovers.services (see `clawnode tailscale policy`)"
                            .to_string(),
                    ),
                ),
            };
            TsServiceState {
                name,
                port: ad.port,
                state: state.to_string(),
                advertised: in_prefs && in_serve,
                approved: vips.is_some(),
                vips: vips.unwrap_or_default(),
                reason,
                cert: target.certs.get(&ad.name).cloned(),
            }
        })
        .collect();
    let relay = relay_doc(status, prefs, target);
    let owner = whois.map(|w| Owner {
        login_name: w["UserProfile"]["LoginName"].as_str().unwrap_or("").into(),
        display_name: w["UserProfile"]["DisplayName"]
            .as_str()
            .unwrap_or("")
            .into(),
    });
    TsStatus {
        backend_state: status
            .backend_state
            .map(|s| s.name().to_string())
            .unwrap_or_default(),
        daemon_version: text(status.version.as_deref()),
        online: me.online,
        hostname: text(me.host_name.as_deref()),
        dns_name: text(me.dns_name.as_deref()).map(|n| n.trim_end_matches('.').to_string()),
        ips: status.tailscale_ips.clone(),
        tailnet: text(status.tailnet_name()),
        magic_dns_suffix: text(status.tailnet_suffix())
            .or_else(|| text(status.magic_dns_suffix.as_deref())),
        tags: me.tags.clone(),
        owner,
        services,
        // Read apart (`LiveTailscale::read`): `status?peers=false` has none.
        paths: None,
        paths_error: None,
        relay,
        error: None,
    }
}

/// The relay this node serves, when configured or set.
fn relay_doc(status: &Status, prefs: &Prefs, target: &Target) -> Option<RelayDoc> {
    let (wanted, port) = (target.relay_wanted, prefs.relay_server_port);
    if wanted.is_none() && port.is_none() {
        return None;
    }
    let too_old = status
        .version
        .as_deref()
        .and_then(Version::parse)
        .is_some_and(|v| v < Version::PEER_RELAY);
    let state = match (port, wanted) {
        (_, Some(_)) if too_old => "unsupported",
        (Some(_), _) if !too_old => "serving",
        (_, Some(_)) => "pending",
        _ => "off",
    };
    Some(RelayDoc {
        wanted,
        port,
        state: state.to_string(),
        problem: target.relay_problem.clone(),
    })
}

/// Each peer's path as `tailscale status` shows it, and a hint for those on DERP while a relay
/// is available. `serving`: this node is a peer relay.
pub fn paths_doc(status: &Status, serving: bool) -> Option<PathsDoc> {
    status.peers.as_ref().map(|peers| {
        let mut peers: Vec<PeerPathDoc> = peers
            .values()
            .filter(|peer| peer.listed())
            .map(|peer| {
                let facts = peer.facts();
                let (path, via) = classify(&facts);
                PeerPathDoc {
                    name: facts.name,
                    ip: facts.ip,
                    path,
                    via,
                    hint: None,
                }
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.ip.cmp(&b.ip)));
        let kinds: Vec<PathKind> = peers.iter().map(|p| p.path).collect();
        let available = relay_available(serving, &kinds);
        if available {
            for peer in peers.iter_mut().filter(|p| p.path == PathKind::Derp) {
                peer.hint = Some(derp_hint(peer.via.as_deref().unwrap_or("")));
            }
        }
        let counts = summarize(peers.iter().map(|p| (p.path, p.via.as_deref())));
        PathsDoc {
            summary: summary_line(&counts),
            counts,
            relay_available: available,
            peers,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn target(services: &[(&str, u16)]) -> Target {
        Target {
            api: LocalApi::new(Path::new("/nonexistent")),
            services: services
                .iter()
                .map(|(n, p)| ServiceAd {
                    name: n.to_string(),
                    port: *p,
                    protocol: "tcp".into(),
                })
                .collect(),
            publish_error: None,
            certs: BTreeMap::new(),
            relay_wanted: None,
            relay_problem: None,
        }
    }

    fn status(value: &Value) -> Status {
        serde_json::from_value(value.clone()).expect("status parses")
    }

    fn prefs(value: Value) -> Prefs {
        serde_json::from_value(value).expect("prefs parse")
    }

    #[test]
    fn a_service_is_approved_only_once_control_lists_it_under_service_host() {
        let mut captured: Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/tailscale/status-scrubbed-linux-1.102.2.json"
        ))
        .unwrap();
        let prefs = prefs(json!({ "AdvertiseServices": ["svc:molt-provider", "svc:gateway"] }));
        let serve = json!({ "Services": {
            "svc:molt-provider": { "TCP": { "8443": { "TCPForward": "127.0.0.1:8443" } } },
            "svc:gateway": { "TCP": { "443": { "TCPForward": "127.0.0.1:443" } } }
        } });
        let t = target(&[("molt-provider", 8443), ("gateway", 443), ("other", 1)]);
        let doc = build(&status(&captured), &prefs, &serve, None, &t);
        let states: Vec<&str> = doc.services.iter().map(|s| s.state.as_str()).collect();
        assert_eq!(
            states,
            ["awaiting approval", "awaiting approval", "not advertised"]
        );
        captured["Self"]["CapMap"]["service-host"] = json!([
            { "svc:molt-provider": ["100.100.1.1", "fd7a:115c:a1e0::100"] },
            { "svc:gateway": ["100.100.1.2"] }
        ]);
        let doc = build(&status(&captured), &prefs, &serve, None, &t);
        assert_eq!(doc.services[0].state, "approved");
        assert_eq!(doc.services[0].vips, ["100.100.1.1", "fd7a:115c:a1e0::100"]);
        assert_eq!(
            doc.services[1].state, "approved",
            "the second object merges"
        );
        assert!(doc.services[1].reason.is_none());
    }

    #[test]
    fn a_failed_publish_shows_its_reason_on_every_service() {
        let mut t = target(&[("molt-provider", 8443)]);
        t.publish_error = Some("service hosts must be tagged nodes".into());
        let doc = build(
            &status(&json!({})),
            &prefs(json!({})),
            &Value::Null,
            None,
            &t,
        );
        assert_eq!(doc.services[0].state, "failed");
        assert_eq!(
            doc.services[0].reason.as_deref(),
            Some("service hosts must be tagged nodes")
        );
    }

    fn mixed() -> Status {
        serde_json::from_str(include_str!(
            "../../../tests/fixtures/tailscale/status-mixed-paths.json"
        ))
        .expect("mixed paths parse")
    }

    #[test]
    fn peers_tailscale_status_hides_are_not_counted() {
        let mut captured: Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/tailscale/status-mixed-paths.json"
        ))
        .unwrap();
        let peers = captured["Peer"].as_object_mut().unwrap();
        let template = peers.values().next().unwrap().clone();
        let mut sharee = template.clone();
        sharee["ShareeNode"] = json!(true);
        peers.insert("nodekey:sharee".into(), sharee);
        for (i, used) in [(0, false), (1, false), (2, true)] {
            let mut offer = template.clone();
            offer["DNSName"] = json!(format!("de-fra-wg-00{i}.mullvad.ts.net."));
            offer["ExitNodeOption"] = json!(true);
            offer["ExitNode"] = json!(used);
            peers.insert(format!("nodekey:mullvad{i}"), offer);
        }
        let paths = paths_doc(&status(&captured), false).unwrap();
        assert_eq!(
            paths.counts.total, 16,
            "15 peers and the exit node in use; not the sharee nor the two offers"
        );
        assert!(paths.peers.iter().any(|p| p.name == "de-fra-wg-002"));
    }

    #[test]
    fn the_mixed_capture_reads_as_its_paths_with_a_hint_for_the_peer_on_derp() {
        let t = target(&[]);
        let doc = build(&mixed(), &prefs(json!({})), &Value::Null, None, &t);
        let paths = paths_doc(&mixed(), false).expect("paths");
        assert_eq!(
            paths.summary,
            "15 peers: 9 direct, 2 peer-relay, 1 DERP fra, 2 idle, 1 offline"
        );
        assert!(
            paths.relay_available,
            "two peers are reached through a relay"
        );
        let hinted: Vec<&str> = paths
            .peers
            .iter()
            .filter(|p| p.hint.is_some())
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(hinted, ["buyer-cgnat"]);
        assert!(
            paths.peers.windows(2).all(|w| w[0].name <= w[1].name),
            "sorted by name"
        );
        assert!(doc.relay.is_none(), "not configured, not set");
        let mut direct = mixed();
        for peer in direct.peers.as_mut().unwrap().values_mut() {
            peer.peer_relay.clear();
        }
        let paths = paths_doc(&direct, false).unwrap();
        assert!(!paths.relay_available);
        assert!(
            paths.peers.iter().all(|p| p.hint.is_none()),
            "no relay, no hint"
        );
        assert!(
            paths_doc(&direct, true).unwrap().relay_available,
            "this node serves"
        );
        let none = build(
            &status(&json!({})),
            &prefs(json!({})),
            &Value::Null,
            None,
            &t,
        );
        assert!(none.paths.is_none(), "a status without a peers map");
    }

    #[test]
    fn the_relay_reads_serving_pending_unsupported_or_off() {
        let mut t = target(&[]);
        let relay = |version: &str, pref: Value, t: &Target| {
            let s = status(&json!({ "Version": version, "Peer": null }));
            build(
                &s,
                &prefs(json!({ "RelayServerPort": pref })),
                &Value::Null,
                None,
                t,
            )
            .relay
        };
        assert_eq!(relay("1.102.2", Value::Null, &t), None);
        let by_hand = relay("1.102.2", json!(41000), &t).unwrap();
        assert_eq!((by_hand.state.as_str(), by_hand.wanted), ("serving", None));
        t.relay_wanted = Some(40000);
        assert_eq!(relay("1.102.2", Value::Null, &t).unwrap().state, "pending");
        let serving = relay("1.102.2", json!(40000), &t).unwrap();
        assert_eq!(
            (serving.state.as_str(), serving.port),
            ("serving", Some(40000))
        );
        t.relay_problem = Some("tailscaled 1.80.3 cannot serve as a peer relay".into());
        let old = relay("1.80.3", Value::Null, &t).unwrap();
        assert_eq!(old.state, "unsupported");
        assert_eq!(old.problem, t.relay_problem);
        let s = status(&json!({ "Version": "1.102.2", "Peer": { "k": {
            "Active": true, "Relay": "fra", "DNSName": "buyer.tail1234.ts.net." } } }));
        t.relay_problem = None;
        let doc = build(
            &s,
            &prefs(json!({ "RelayServerPort": 40000 })),
            &Value::Null,
            None,
            &t,
        );
        let serving = doc.relay.is_some_and(|r| r.state == "serving");
        let paths = paths_doc(&s, serving).unwrap();
        assert!(paths.relay_available, "this node serves");
        assert!(
            paths.peers[0]
                .hint
                .as_deref()
                .unwrap()
                .starts_with("through DERP fra")
        );
    }

    #[test]
    fn identity_comes_from_self_the_tailnet_and_whois() {
        let reported = status(&json!({
            "BackendState": "Running",
            "Version": "1.102.2-tabc",
            "TailscaleIPs": ["100.101.102.103", "fd7a:115c:a1e0::1"],
            "Self": { "HostName": "clawnode-gpu-01", "DNSName": "clawnode-gpu-01.tail1234.ts.net.",
                      "Online": true, "Tags": ["tag:gpu"], "CapMap": null, "Unknown": 1 },
            "CurrentTailnet": { "Name": "example.com", "MagicDNSSuffix": "tail1234.ts.net" }
        }));
        let whois = json!({ "UserProfile": { "LoginName": "clawnode-gpu-01.tail1234.ts.net", "DisplayName": "clawnode-gpu-01" } });
        let doc = build(
            &reported,
            &prefs(json!({})),
            &Value::Null,
            Some(&whois),
            &target(&[]),
        );
        assert_eq!(
            doc.dns_name.as_deref(),
            Some("clawnode-gpu-01.tail1234.ts.net")
        );
        assert_eq!(doc.tailnet.as_deref(), Some("example.com"));
        assert_eq!(doc.tags, ["tag:gpu"]);
        assert!(doc.online);
        assert_eq!(
            doc.owner.unwrap().login_name,
            "clawnode-gpu-01.tail1234.ts.net"
        );
        assert_eq!(doc.backend_state, "Running");
        assert_eq!(doc.daemon_version.as_deref(), Some("1.102.2-tabc"));
        assert!(reported.approved_services().is_empty(), "null CapMap");
    }
}
