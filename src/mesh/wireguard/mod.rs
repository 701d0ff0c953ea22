//! The self-hosted mesh: clawnode owns a WireGuard interface, its key, addresses, routes and
//! peers, and keeps them as configured.
//!
//! Backends: the kernel module (generic netlink through wireguard-control, links through
//! rtnetlink) or a userspace daemon clawnode supervises (UAPI through wireguard-control).
//! Peers are applied as a diff by public key (`core::peer_diff`), so unchanged peers keep
//! their sessions.

pub mod device;
pub mod keys;
pub mod link;
mod monitor;
pub mod status;
pub mod userspace;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::IpNet;
use wireguard_control::Backend;

use crate::config::{self, Config, PeerConfig, WgBackend, WireguardConfig};
use crate::core::peer_diff::{self, PeerKey, PeerMap, PeerSpec};

use super::{
    BoxFuture, Callers, Hooks, Joined, MeshError, MeshProvider, MeshStatus, NodeInfoSpot, Recheck,
    ServiceAd,
};
use device::{DeviceChange, DeviceState, WgControl, WgDevice};
use link::{KernelSupport, Link};

struct Trusted {
    interface: String,
    daemon_pid: Option<u32>,
    public_key: PeerKey,
    listen_port: u16,
    fwmark: u32,
}

/// Which backend runs the interface, once chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    Kernel,
    Userspace,
}

impl Chosen {
    pub fn as_str(self) -> &'static str {
        match self {
            Chosen::Kernel => "kernel",
            Chosen::Userspace => "userspace",
        }
    }
}

pub struct WireguardMesh {
    recheck: Recheck,
    hooks_live: super::Live,
    live: status::LiveTarget,
    monitor: Option<monitor::Monitor>,
    link: Option<Link>,
    chosen: Option<(Chosen, String)>,
    daemon: Option<userspace::Daemon>,
    /// The peers clawnode last applied, to tell configured endpoint changes from roaming.
    applied: PeerMap,
    /// The device as clawnode last left it, when nothing since can have changed it: then a
    /// config change is diffed against this instead of reading the whole device back.
    trusted: Option<Trusted>,
    /// Set by the monitor when the device may have changed behind clawnode's back.
    needs_read: Arc<AtomicBool>,
    keep_interface: bool,
}

impl WireguardMesh {
    pub fn new(hooks: Hooks) -> Self {
        Self {
            recheck: hooks.recheck,
            hooks_live: hooks.live,
            live: status::LiveTarget::default(),
            monitor: None,
            link: None,
            chosen: None,
            daemon: None,
            applied: PeerMap::new(),
            trusted: None,
            needs_read: Arc::new(AtomicBool::new(true)),
            keep_interface: false,
        }
    }

    async fn choose_backend(
        &mut self,
        wg: &WireguardConfig,
        link: &Link,
    ) -> Result<Chosen, MeshError> {
        let iface = wg.interface.as_str();
        if let Some((chosen, for_iface)) = &self.chosen
            && for_iface == iface
        {
            return Ok(*chosen);
        }
        let found = userspace::find_program(&wg.userspace_implementation);
        let (chosen, why) = match wg.backend {
            WgBackend::Kernel => (Chosen::Kernel, "backend = \"kernel\"".to_string()),
            WgBackend::Userspace => (Chosen::Userspace, "backend = \"userspace\"".to_string()),
            WgBackend::Auto => match link.probe_kernel().await.map_err(failed)? {
                KernelSupport::Available => (
                    Chosen::Kernel,
                    "the WireGuard kernel module is available".into(),
                ),
                KernelSupport::Missing => match &found {
                    Some(path) => (
                        Chosen::Userspace,
                        format!("no WireGuard kernel module; {} found", path.display()),
                    ),
                    None => {
                        return Err(MeshError::transient(format!(
                            "no WireGuard available: the kernel has no wireguard module (load it: modprobe wireguard) and no userspace implementation {:?} was found (install wireguard-go, or set [network.wireguard] userspace_implementation)",
                            wg.userspace_implementation.display().to_string()
                        )));
                    }
                },
            },
        };
        tracing::info!(component = "mesh", interface = iface, backend = chosen.as_str(), reason = %why, "chose WireGuard backend");
        self.chosen = Some((chosen, iface.to_string()));
        Ok(chosen)
    }

    async fn join_inner(&mut self, config: &Config) -> Result<Joined, MeshError> {
        let wg = &config.network.wireguard;
        let iface = wg.interface.as_str().to_string();
        let Some(address) = wg.address else {
            return Err(MeshError::transient(
                "[network.wireguard] address is not set",
            ));
        };
        if self.link.is_none() {
            self.link = Some(Link::connect().map_err(failed)?);
        }
        let link = self.link.take().expect("set above");
        let result = self.configure(wg, &iface, address, &link).await;
        self.link = Some(link);
        result
    }

    async fn configure(
        &mut self,
        wg: &WireguardConfig,
        iface: &str,
        address: IpNet,
        link: &Link,
    ) -> Result<Joined, MeshError> {
        self.keep_interface = wg.keep_interface_on_stop;
        let chosen = self.choose_backend(wg, link).await?;
        let backend = match chosen {
            Chosen::Kernel => {
                link.create_wireguard(iface).await.map_err(failed)?;
                Backend::Kernel
            }
            Chosen::Userspace => {
                let daemon = self.daemon.get_or_insert_with(|| {
                    userspace::Daemon::new(iface, &wg.userspace_implementation)
                });
                daemon.ensure_running().await.map_err(failed)?;
                Backend::Userspace
            }
        };

        let key = keys::load_or_generate(&wg.private_key_file).map_err(failed)?;
        let public = key.public();
        let (peers, problems) = config::peers::configured_peers(wg);
        let desired = desired_peers(&peers).await?;

        let device = WgControl { backend };
        let iface_owned = iface.to_string();
        let applied = self.applied.clone();
        let (listen_port, fwmark) = (wg.listen_port, wg.fwmark.unwrap_or(0));
        let desired_for_apply = desired.clone();
        let daemon_pid = self.daemon.as_ref().and_then(userspace::Daemon::pid);
        let must_read = self.needs_read.swap(false, Ordering::AcqRel);
        let known = self
            .trusted
            .take()
            .filter(|t| !must_read && t.interface == iface && t.daemon_pid == daemon_pid)
            .map(|t| DeviceState {
                public_key: Some(t.public_key),
                listen_port: Some(t.listen_port),
                fwmark: (t.fwmark != 0).then_some(t.fwmark),
                peers: applied.clone(),
                stats: Vec::new(),
            });
        let (peer_changes, settings_changed) = tokio::task::spawn_blocking(move || {
            let state = match known {
                Some(state) => state,
                None => device.read(&iface_owned)?,
            };
            let diff = peer_diff::diff(&state.peers, &desired_for_apply, &applied);
            let change = DeviceChange {
                private_key: (state.public_key != Some(key.public())).then_some(&key),
                listen_port: (state.listen_port != Some(listen_port)).then_some(listen_port),
                fwmark: (state.fwmark.unwrap_or(0) != fwmark).then_some(fwmark),
                peers: &diff,
            };
            let settings_changed = change.private_key.is_some()
                || change.listen_port.is_some()
                || change.fwmark.is_some();
            device.apply(&iface_owned, &change)?;
            Ok::<_, std::io::Error>((diff.len(), settings_changed))
        })
        .await
        .map_err(|e| MeshError::transient(format!("WireGuard apply task failed: {e}")))?
        .map_err(|e| MeshError::transient(format!("configure WireGuard device {iface}: {e}")))?;
        self.applied = desired.clone();
        self.trusted = Some(Trusted {
            interface: iface.to_string(),
            daemon_pid,
            public_key: public,
            listen_port,
            fwmark,
        });

        let Some(state) = link.get(iface).await.map_err(failed)? else {
            return Err(MeshError::transient(format!(
                "interface {iface} vanished while being configured"
            )));
        };
        let routes = routes_for(wg, &desired);
        let link_changes = link
            .configure(&state, u32::from(wg.mtu), &[address], &routes)
            .await
            .map_err(failed)?;
        let owned = crate::core::drift::OwnedLink {
            index: state.index,
            name: iface.to_string(),
            mtu: u32::from(wg.mtu),
        };
        let daemon_exit = self.daemon.as_ref().and_then(userspace::Daemon::exited);
        let daemon_pid = self.daemon.as_ref().and_then(userspace::Daemon::pid);
        if self
            .monitor
            .as_ref()
            .is_none_or(|m| !m.watches(&owned, daemon_pid, &wg.peers_dir, wg.reconcile_interval))
        {
            self.monitor = Some(
                monitor::Monitor::start(
                    owned,
                    daemon_pid,
                    daemon_exit,
                    &wg.peers_dir,
                    wg.reconcile_interval,
                    self.recheck.clone(),
                    Arc::clone(&self.needs_read),
                )
                .map_err(failed)?,
            );
        }
        self.hooks_live.set(Some(Arc::new(self.live.clone())));
        self.live.set(Some(status::Target {
            interface: iface.to_string(),
            backend,
            backend_name: chosen.as_str(),
            addresses: vec![address.to_string()],
            names: peers
                .iter()
                .map(|p| (PeerKey(*p.public_key.as_bytes()), p.name.clone()))
                .collect(),
        }));
        if peer_changes > 0 || settings_changed || !link_changes.is_empty() {
            tracing::info!(component = "mesh", interface = iface, peer_changes, settings_changed, link = ?link_changes, "WireGuard interface reconciled");
        }

        let status = MeshStatus {
            provider: format!("wireguard/{}", chosen.as_str()),
            interface: Some(iface.to_string()),
            address: Some(address.to_string()),
            peers: desired.len(),
            problems,
        };
        let node_info = NodeInfoSpot {
            interface: iface.to_string(),
            listen: SocketAddr::new(address.addr(), wg.node_info_port),
            public_key: keys::to_base64(&public),
            callers: Callers::Within(wg.mesh_cidr),
            essential: true,
        };
        Ok(Joined {
            status,
            node_info: Some(node_info),
        })
    }
}

impl MeshProvider for WireguardMesh {
    fn join<'a>(&'a mut self, config: &'a Config) -> BoxFuture<'a, Result<Joined, MeshError>> {
        Box::pin(self.join_inner(config))
    }

    fn publish<'a>(
        &'a mut self,
        _services: &'a [ServiceAd],
    ) -> BoxFuture<'a, Result<(), MeshError>> {
        // Peers read this node's services from its node-info endpoint, which the shell runs.
        Box::pin(async { Ok(()) })
    }

    fn withdraw(&mut self) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async { Ok(()) })
    }

    fn leave(&mut self) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move {
            self.monitor = None;
            self.live.set(None);
            self.hooks_live.set(None);
            if self.keep_interface {
                tracing::info!(
                    component = "mesh",
                    "keeping the WireGuard interface (keep_interface_on_stop = true)"
                );
                return Ok(());
            }
            let iface = self.chosen.as_ref().map(|(_, i)| i.clone());
            if let Some(mut daemon) = self.daemon.take() {
                daemon.stop().await;
            }
            if let (Some(link), Some(iface)) = (&self.link, iface) {
                link.delete(&iface).await.map_err(failed)?;
                tracing::info!(component = "mesh", interface = %iface, "removed the WireGuard interface");
            }
            self.applied.clear();
            self.trusted = None;
            Ok(())
        })
    }
}

/// The peers to apply, endpoints resolved now (a name that does not resolve leaves the peer
/// without an endpoint until the next reconcile tries again).
pub async fn desired_peers(peers: &[PeerConfig]) -> Result<PeerMap, MeshError> {
    let mut out = BTreeMap::new();
    for peer in peers {
        let key = PeerKey(*peer.public_key.as_bytes());
        let mut spec = PeerSpec::new(key, peer.allowed_ips.clone());
        spec.keepalive = peer.persistent_keepalive;
        if let Some(path) = &peer.preshared_key_file {
            spec.psk = Some(keys::read_psk(path).map_err(failed)?);
        }
        if let Some(endpoint) = &peer.endpoint {
            match tokio::net::lookup_host((endpoint.host(), endpoint.port())).await {
                Ok(mut addrs) => spec.endpoint = addrs.next(),
                Err(error) => {
                    tracing::warn!(component = "mesh", peer = %peer.name, endpoint = %endpoint, %error, "cannot resolve peer endpoint; will retry");
                }
            }
        }
        out.insert(key, spec);
    }
    Ok(out)
}

/// The mesh CIDR, and every peer network outside it.
fn routes_for(wg: &WireguardConfig, peers: &PeerMap) -> Vec<IpNet> {
    let mut routes = vec![wg.mesh_cidr];
    for net in peers.values().flat_map(|p| &p.allowed_ips) {
        if !wg.mesh_cidr.contains(net) && !routes.contains(net) {
            routes.push(*net);
        }
    }
    routes
}

fn failed(error: impl std::fmt::Display) -> MeshError {
    MeshError::transient(error.to_string())
}
