//! The self-hosted mesh: clawnode owns a WireGuard interface, its key, addresses, routes and
//! peers, and keeps them as configured.
//!
//! Backends: the kernel module (generic netlink through wireguard-control, links through
//! rtnetlink) or a userspace daemon clawnode supervises (UAPI through wireguard-control).
//! Peers are applied as a diff by public key (`core::peer_diff`), so unchanged peers keep
//! their sessions.

pub mod device;
pub mod errors;
pub mod keys;
pub mod link;
mod monitor;
pub mod plan;
pub mod reconcile;
pub mod resolve;
mod routes;
pub mod status;
pub mod userspace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::IpNet;
use wireguard_control::Backend;

use crate::config::{Config, WgBackend, WireguardConfig};

use super::{
    BoxFuture, Callers, Hooks, Joined, MeshError, MeshProvider, MeshStatus, NodeInfoSpot, Recheck,
    ServiceAd,
};
use device::{WgControl, WgDevice};
use errors::WgError;
use link::{KernelSupport, Link};
use reconcile::{DeviceSync, Synced, Wanted};

/// Makes the device handle for a chosen backend; tests hand in a fake.
pub type DeviceFactory = Box<dyn Fn(Backend) -> Arc<dyn WgDevice> + Send + Sync>;

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
    device: DeviceFactory,
    /// What clawnode applied to the device, so a config change need not read it back.
    sync: DeviceSync,
    /// Set by the monitor when the device may have changed behind clawnode's back.
    needs_read: Arc<AtomicBool>,
    keep_interface: bool,
    resolver: resolve::Resolver,
    /// The routes clawnode created, removed when their peer goes and on stop.
    routes: crate::core::routes::OwnedRoutes,
}

impl WireguardMesh {
    /// The mesh on the real device (wireguard-control).
    pub fn new(hooks: Hooks) -> Self {
        Self::with_device(hooks, |backend| Arc::new(WgControl { backend }))
    }

    /// The mesh on whatever device `device` makes for the chosen backend.
    pub fn with_device(
        hooks: Hooks,
        device: impl Fn(Backend) -> Arc<dyn WgDevice> + Send + Sync + 'static,
    ) -> Self {
        Self {
            recheck: hooks.recheck,
            hooks_live: hooks.live,
            live: status::LiveTarget::default(),
            monitor: None,
            link: None,
            chosen: None,
            daemon: None,
            device: Box::new(device),
            sync: DeviceSync::default(),
            needs_read: Arc::new(AtomicBool::new(true)),
            keep_interface: false,
            resolver: resolve::Resolver::default(),
            routes: Default::default(),
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
            WgBackend::Auto => match link.probe_kernel().await? {
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
                        return Err(WgError::NoWireguard {
                            program: wg.userspace_implementation.display().to_string(),
                        }
                        .into());
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
            return Err(WgError::NoAddress.into());
        };
        let link = match self.link.take() {
            Some(link) => link,
            None => Link::connect()?,
        };
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
                link.create_wireguard(iface).await?;
                Backend::Kernel
            }
            Chosen::Userspace => {
                let daemon = self.daemon.get_or_insert_with(|| {
                    userspace::Daemon::new(iface, &wg.userspace_implementation)
                });
                daemon.ensure_running().await?;
                Backend::Userspace
            }
        };

        let key = keys::load_or_generate(&wg.private_key_file)?;
        let public = key.public();
        // A bad peer (unreadable preshared key, unsafe route) is skipped and reported, never
        // the mesh.
        let ours = link.get(iface).await?.map(|state| state.index);
        let plan = plan::plan(wg, &self.resolver, link.local_networks(ours).await?).await;
        let want = Wanted {
            interface: iface.to_string(),
            key,
            listen_port: wg.listen_port,
            fwmark: wg.fwmark.unwrap_or(0),
            peers: plan.peers,
            daemon_pid: self.daemon.as_ref().and_then(userspace::Daemon::pid),
        };
        let device = (self.device)(backend);
        let device_for_sync = Arc::clone(&device);
        let must_read = self.needs_read.swap(false, Ordering::AcqRel);
        // The sync travels to the blocking pool and back; if the task dies it stays at the
        // default, which trusts nothing and so reads the device next time.
        let mut sync = std::mem::take(&mut self.sync);
        let (sync, synced) = tokio::task::spawn_blocking(move || {
            let synced = sync.sync(device_for_sync.as_ref(), want, must_read);
            (sync, synced)
        })
        .await
        .map_err(|e| WgError::ApplyTask(e.to_string()))?;
        self.sync = sync;
        let synced = synced.map_err(|source| WgError::Device {
            interface: iface.to_string(),
            source,
        })?;
        let desired = self.sync.applied();

        let Some(state) = link.get(iface).await? else {
            return Err(WgError::Vanished(iface.to_string()).into());
        };
        let peer_count = desired.len();
        let link_changes = routes::configure(
            link,
            &state,
            wg.mtu,
            address,
            &plan.routes,
            &mut self.routes,
        )
        .await?;
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
            self.monitor = Some(monitor::Monitor::start(
                owned,
                daemon_pid,
                daemon_exit,
                &wg.peers_dir,
                wg.reconcile_interval,
                self.recheck.clone(),
                Arc::clone(&self.needs_read),
            )?);
        }
        self.hooks_live.set(Some(Arc::new(self.live.clone())));
        self.live.set(Some(status::Target {
            interface: iface.to_string(),
            device,
            backend_name: chosen.as_str(),
            addresses: vec![address.to_string()],
            names: plan.names.into_iter().collect(),
        }));
        let Synced {
            peer_changes,
            settings_changed,
            read,
        } = synced;
        if peer_changes > 0 || settings_changed || !link_changes.is_empty() {
            tracing::info!(component = "mesh", interface = iface, peer_changes, settings_changed, read_device = read, link = ?link_changes, "WireGuard interface reconciled");
        }

        let status = MeshStatus {
            provider: format!("wireguard/{}", chosen.as_str()),
            interface: Some(iface.to_string()),
            address: Some(address.to_string()),
            peers: peer_count,
            problems: plan.problems,
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
            if let Some(link) = &self.link {
                routes::remove_all(link, &mut self.routes).await;
            }
            if let Some(mut daemon) = self.daemon.take() {
                daemon.stop().await;
            }
            if let (Some(link), Some(iface)) = (&self.link, iface) {
                link.delete(&iface).await?;
                tracing::info!(component = "mesh", interface = %iface, "removed the WireGuard interface");
            }
            self.sync = DeviceSync::default();
            Ok(())
        })
    }
}
