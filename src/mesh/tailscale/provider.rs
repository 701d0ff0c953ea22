//! The `tailscale` mesh provider: bring-up through `start` only when needed, Tailscale
//! Services advertised the way `tailscale serve --service` does it, a drain-then-clear
//! withdrawal, the peer relay port (`relay`), and a bus watcher that asks for a recheck
//! whenever tailscaled changes state or comes back after a restart.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use hyper::Method;
use serde_json::json;

use super::advertise::load_owned;
use super::authkey::Secret;
use super::certs::{self, CertKeeper};
use super::localapi::{LocalApi, Version};
use super::login::{self, Login};
use super::types::{Prefs, Status};
use super::{status, watcher};
use crate::config::Config;
use crate::core::tailscale_plan::{Current, Plan, Tailnet, Wanted, check_joined, plan};
use crate::mesh::{
    BoxFuture, Callers, Hooks, Joined, MeshError, MeshProvider, MeshStatus, NodeInfoSpot,
    ServiceAd, Voucher,
};

pub struct TailscaleMesh {
    pub(super) hooks: Hooks,
    pub(super) live: status::LiveTailscale,
    pub(super) api: Option<LocalApi>,
    /// The `svc:` names clawnode advertised, loaded from the state directory on first join.
    pub(super) owned: Option<BTreeSet<String>>,
    pub(super) state_dir: PathBuf,
    /// The tailnet's MagicDNS suffix, for the `Web` keys of HTTP services.
    pub(super) suffix: String,
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// What was last published, re-applied on every join: tailscaled may have restarted and
    /// lost it, and the check costs two reads when nothing changed.
    pub(super) published: Option<Vec<ServiceAd>>,
    certs: Option<CertKeeper>,
    /// A key resolved for a login that has not completed yet.
    pending_key: Option<Secret>,
    /// `relay_clear_on_stop` as of the last join: `leave` has no config at hand.
    pub(super) relay_clear_on_stop: bool,
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
            relay_clear_on_stop: false,
        }
    }

    pub(super) fn api(&self) -> Result<&LocalApi, MeshError> {
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
        // Taken before anything can fail: a stop before the first good join clears too.
        self.relay_clear_on_stop = ts.relay_clear_on_stop;
        if self.owned.is_none() {
            self.owned = Some(load_owned(&self.state_dir));
        }
        let api = self.api()?.clone();
        if self.watcher.as_ref().is_none_or(|w| w.is_finished()) {
            self.watcher = Some(watcher::spawn(api.clone(), self.hooks.recheck.clone()));
        }

        let reply = api.get("/localapi/v0/status?peers=false").await?;
        let status: Status = reply.json("status")?;
        if !config.services.is_empty()
            && let Some(v) = reply.version
            && v < Version::SERVICES
        {
            return Err(MeshError::needs_operator(format!(
                "tailscaled {v} is too old for Tailscale Services (1.86 or newer is needed)"
            )));
        }
        let hostname = format!("{}-{}", ts.hostname_prefix, config.node.name);
        let tags: Vec<String> = ts.tags.iter().map(|t| t.to_string()).collect();
        let prefs: Prefs = api.read("/localapi/v0/prefs").await?;
        let current = Current {
            state: status.backend_state,
            have_node_key: status.have_node_key,
            hostname: prefs.hostname.as_deref(),
            tags: prefs.tags(),
        };
        let wanted = Wanted {
            hostname: &hostname,
            tags: &tags,
            has_auth: ts.auth.is_some(),
        };
        match plan(&current, &wanted) {
            Plan::Nothing => {}
            Plan::Rename => {
                // A rename does not need `start`, which would tear down the control connection.
                let body = json!({ "Hostname": hostname, "HostnameSet": true });
                api.send_json(Method::PATCH, "/localapi/v0/prefs", &body)
                    .await?;
            }
            Plan::BringUp {
                needs_auth,
                login_interactive,
            } => {
                let login = Login {
                    hostname: &hostname,
                    tags: &tags,
                    needs_auth,
                    login_interactive,
                };
                login::bring_up(&api, ts, prefs, login, &mut self.pending_key).await?;
            }
            Plan::Refuse(refusal) => return Err(refusal),
        }

        let status: Status = api.read("/localapi/v0/status?peers=false").await?;
        self.suffix = status.tailnet_suffix().unwrap_or("").to_string();
        let tailnet = Tailnet {
            name: status.tailnet_name(),
            magic_dns_suffix: status.tailnet_suffix(),
        };
        check_joined(status.backend_state, tailnet, ts.tailnet.as_deref())?;
        self.live.attach(api.clone());
        self.hooks.live.set(Some(Arc::new(self.live.clone())));
        let relay_problem = self
            .apply_relay(&api, ts.relay_server_port, status.version.as_deref())
            .await;
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
            dir: config.node.state_dir.join(crate::state::CERTS_DIR),
        });
        if let Some(services) = self.published.clone() {
            self.publish_recorded(&services).await?;
        }
        let ipv4 = status
            .tailscale_ips
            .iter()
            .find_map(|ip| ip.parse::<Ipv4Addr>().ok());
        let mut problems = self.awaiting_approval(&status);
        problems.extend(relay_problem);
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
                gateway: None,
            },
            node_info,
        })
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
            // The node stays logged in; only clawnode's own watcher stops, and the relay port
            // clawnode set goes when configured to.
            self.relay_stop().await;
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
    status: &Status,
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
        public_key: status.self_node.public_key.clone().unwrap_or_default(),
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
