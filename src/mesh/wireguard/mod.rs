//! The self-hosted mesh: clawnode owns a WireGuard interface, its key, addresses, routes and
//! peers, and keeps them as configured.
//!
//! Backends: the kernel module (generic netlink through wireguard-control, links through
//! rtnetlink) or a userspace daemon clawnode supervises (UAPI through wireguard-control).
//! Peers are applied as a diff by public key (`core::peer_diff`), so unchanged peers keep
//! their sessions.

pub mod device;
pub mod errors;
pub mod gateway;
pub mod keys;
pub mod link;
mod monitor;
pub mod owner;
pub mod plan;
pub mod reconcile;
pub mod resolve;
mod routes;
pub mod status;
pub mod userspace;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::IpNet;
use wireguard_control::Backend;

use crate::config::{Config, WgBackend, WireguardConfig};
use crate::core::link_owner::{self, Created, Verdict, WgKind};

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
        self.kind().as_str()
    }

    fn kind(self) -> WgKind {
        match self {
            Chosen::Kernel => WgKind::Kernel,
            Chosen::Userspace => WgKind::Userspace,
        }
    }
}

/// The settings a backend was chosen for: another interface, backend or program is chosen anew.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Choice {
    interface: String,
    backend: WgBackend,
    program: PathBuf,
}

/// The interface in use.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Current {
    interface: String,
    chosen: Chosen,
    program: PathBuf,
    /// Taken over with `adopt_existing_interface`: configured, never deleted.
    adopted: bool,
}

pub struct WireguardMesh {
    recheck: Recheck,
    gpus: super::GpuSummaryCell,
    hooks_live: super::Live,
    live: status::LiveTarget,
    monitor: Option<monitor::Monitor>,
    /// Never taken out while a join runs: a stop that aborts the join still needs it.
    link: Option<Arc<Link>>,
    chosen: Option<(Chosen, Choice)>,
    current: Option<Current>,
    /// The interface clawnode created (loaded from `record` after a restart).
    created: Option<Created>,
    /// A kernel link being created and not yet recorded: named before the request, so a stop
    /// that aborts the join still removes it.
    creating: Option<String>,
    /// Where `created` is kept; fixed at the first join, like the state directory itself.
    record: Option<PathBuf>,
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
    /// Gateway coordination, once the node has joined a cluster (or has a token to).
    gateway: Option<gateway::Coordinator>,
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
            gpus: hooks.gpus,
            hooks_live: hooks.live,
            live: status::LiveTarget::default(),
            monitor: None,
            link: None,
            chosen: None,
            current: None,
            created: None,
            creating: None,
            record: None,
            daemon: None,
            device: Box::new(device),
            sync: DeviceSync::default(),
            needs_read: Arc::new(AtomicBool::new(true)),
            keep_interface: false,
            resolver: resolve::Resolver::default(),
            routes: Default::default(),
            gateway: None,
        }
    }

    async fn choose_backend(
        &mut self,
        wg: &WireguardConfig,
        link: &Link,
    ) -> Result<Chosen, MeshError> {
        let iface = wg.interface.as_str();
        let choice = Choice {
            interface: iface.to_string(),
            backend: wg.backend,
            program: wg.userspace_implementation.clone(),
        };
        if let Some((chosen, for_choice)) = &self.chosen
            && *for_choice == choice
        {
            return Ok(*chosen);
        }
        let found = userspace::find_program(&wg.userspace_implementation);
        let (chosen, why) = match wg.backend {
            // Probed, so a reload to a kernel without the module fails before the interface
            // in use is taken down.
            WgBackend::Kernel => match link.probe_kernel().await? {
                KernelSupport::Available => (Chosen::Kernel, "backend = \"kernel\"".to_string()),
                KernelSupport::Missing => {
                    return Err(link::LinkError::NoKernelModule(iface.to_string()).into());
                }
            },
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
        self.chosen = Some((chosen, choice));
        Ok(chosen)
    }

    async fn join_inner(&mut self, config: &Config) -> Result<Joined, MeshError> {
        let wg = &config.network.wireguard;
        let iface = wg.interface.as_str().to_string();
        if self.gateway.is_none() {
            let key = keys::load_or_generate(&wg.private_key_file)?;
            let me = gateway::NodeIdentity {
                name: config.node.name.to_string(),
                wg_key: key.public(),
                listen_port: wg.listen_port,
                interface: iface.clone(),
            };
            self.gateway = gateway::Coordinator::start(
                config,
                &me,
                self.recheck.clone(),
                self.gpus.subscribe(),
            )
            .await?;
        }
        // The configured address wins; without one the gateway assigned it.
        let Some(address) = wg
            .address
            .or_else(|| self.gateway.as_ref().map(gateway::Coordinator::address))
        else {
            return Err(WgError::NoAddress.into());
        };
        let link = self.link()?;
        if self.record.is_none() {
            self.record = Some(owner::record_path(&config.node.state_dir));
        }
        self.configure(wg, &iface, address, &link).await
    }

    fn link(&mut self) -> Result<Arc<Link>, MeshError> {
        if let Some(link) = &self.link {
            return Ok(Arc::clone(link));
        }
        let link = Arc::new(Link::connect()?);
        self.link = Some(Arc::clone(&link));
        Ok(link)
    }

    /// Make sure the interface `iface` of the chosen backend exists and is clawnode's to
    /// configure: created by clawnode (now or in an earlier run), or adopted on the operator's
    /// say-so. Anything else of that name is left untouched and reported.
    async fn claim(
        &mut self,
        wg: &WireguardConfig,
        iface: &str,
        chosen: Chosen,
        link: &Link,
    ) -> Result<(), MeshError> {
        if self.created.is_none()
            && let Some(path) = &self.record
        {
            self.created = owner::load(path);
        }
        let here = owner::here();
        let mut verdict = self.judge(wg, iface, chosen, link, &here).await?;
        if let Verdict::Refuse(refusal) = verdict {
            // Before anything is taken down: a reload to a name that is not clawnode's keeps
            // the interface in use.
            return Err(WgError::NotOurs {
                interface: iface.to_string(),
                refusal,
            }
            .into());
        }
        if let Some(current) = &self.current
            && (current.interface != iface
                || current.chosen != chosen
                || (chosen == Chosen::Userspace && current.program != wg.userspace_implementation))
        {
            tracing::info!(component = "mesh", from = %current.interface, to = iface, backend = chosen.as_str(), "replacing the WireGuard interface");
            self.teardown(link).await?;
            verdict = self.judge(wg, iface, chosen, link, &here).await?;
        }
        if verdict == Verdict::Owned
            && chosen == Chosen::Userspace
            && !self
                .daemon
                .as_ref()
                .is_some_and(userspace::Daemon::is_running)
        {
            // Served by a daemon of an earlier run (kept on stop, or clawnode crashed): not
            // this process's child to supervise, so it is replaced.
            verdict = Verdict::Replace;
        }
        match verdict {
            Verdict::Refuse(refusal) => {
                return Err(WgError::NotOurs {
                    interface: iface.to_string(),
                    refusal,
                }
                .into());
            }
            Verdict::Adopt => {
                if self.current.as_ref().is_none_or(|c| !c.adopted) {
                    tracing::warn!(
                        component = "mesh",
                        interface = iface,
                        "adopting an existing WireGuard interface clawnode did not create (adopt_existing_interface = true); it is left in place on stop"
                    );
                }
                // Its daemon, if userspace, is not clawnode's: it is used, never started.
                self.daemon = None;
            }
            Verdict::Replace => {
                self.remove_created(link).await?;
                self.create(wg, iface, chosen, link).await?;
            }
            Verdict::Create => self.create(wg, iface, chosen, link).await?,
            Verdict::Owned => {
                if chosen == Chosen::Userspace
                    && let Some(daemon) = &mut self.daemon
                {
                    daemon.ensure_running().await?;
                }
            }
        }
        self.current = Some(Current {
            interface: iface.to_string(),
            chosen,
            program: wg.userspace_implementation.clone(),
            adopted: verdict == Verdict::Adopt,
        });
        if verdict != Verdict::Adopt
            && let Some(found) = owner::find(link, iface).await?
        {
            let created = Created {
                name: iface.to_string(),
                index: found.index,
                kind: chosen.kind(),
                boot_id: here.boot_id,
                netns: here.netns,
            };
            if self.created.as_ref() != Some(&created) {
                if let Some(path) = &self.record {
                    owner::save(path, &created).map_err(WgError::from)?;
                }
                self.created = Some(created);
            }
            self.creating = None;
        }
        Ok(())
    }

    /// What the link named `iface` is to clawnode.
    async fn judge(
        &self,
        wg: &WireguardConfig,
        iface: &str,
        chosen: Chosen,
        link: &Link,
        here: &link_owner::Here,
    ) -> Result<Verdict, MeshError> {
        let found = owner::find(link, iface).await?;
        Ok(link_owner::verdict(
            iface,
            found.as_ref(),
            self.created.as_ref(),
            chosen.kind(),
            wg.adopt_existing_interface,
            here,
        ))
    }

    /// Create the interface: a kernel link, or the userspace daemon that makes its tun.
    async fn create(
        &mut self,
        wg: &WireguardConfig,
        iface: &str,
        chosen: Chosen,
        link: &Link,
    ) -> Result<(), MeshError> {
        match chosen {
            Chosen::Kernel => {
                self.creating = Some(iface.to_string());
                if let Err(error) = link.create_wireguard(iface).await {
                    // Not created (a link of that name appeared, or no module): nothing to remove.
                    self.creating = None;
                    return Err(error.into());
                }
            }
            Chosen::Userspace => {
                let ours = self
                    .daemon
                    .as_ref()
                    .is_some_and(userspace::Daemon::is_running);
                if !ours && userspace::socket_answers(iface) {
                    return Err(WgError::SocketInUse {
                        interface: iface.to_string(),
                        socket: userspace::socket_path(iface).display().to_string(),
                    }
                    .into());
                }
                let daemon = self.daemon.get_or_insert_with(|| {
                    userspace::Daemon::new(iface, &wg.userspace_implementation)
                });
                daemon.ensure_running().await?;
            }
        }
        Ok(())
    }

    /// Remove the interface clawnode created, and only that one: its daemon stops (taking the
    /// tun with it) and a kernel link goes if it is still the very link clawnode made.
    async fn remove_created(&mut self, link: &Link) -> Result<(), MeshError> {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.stop().await;
        }
        // Acted on only while the record names the very link that has the name now: a record
        // from another boot or namespace, or of a link since replaced, claims nothing.
        let here = owner::here();
        let mut live = None;
        if let Some(created) = self.created.clone()
            && let Some(found) = owner::find(link, &created.name).await?
            && created.is(&created.name, &found, &here)
        {
            live = Some(created);
        }
        if let Some(created) = live {
            if created.kind == WgKind::Userspace {
                // A daemon from an earlier run ends when its socket is deleted; its tun goes
                // with it a moment later.
                let _ = std::fs::remove_file(userspace::socket_path(&created.name));
                for _ in 0..100 {
                    match link.get(&created.name).await? {
                        Some(state) if state.index == created.index => {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        _ => break,
                    }
                }
            }
            if link.delete_exact(&created.name, created.index).await? {
                tracing::info!(component = "mesh", interface = %created.name, "removed the WireGuard interface");
            }
        }
        self.remove_half_made(link).await?;
        self.created = None;
        if let Some(path) = &self.record {
            owner::remove(path);
        }
        Ok(())
    }

    /// Stop using the current interface: removed if clawnode created it, left as it is if it
    /// was adopted.
    /// The link a join was creating when it was interrupted, if it got that far.
    async fn remove_half_made(&mut self, link: &Link) -> Result<(), MeshError> {
        if let Some(name) = self.creating.take()
            && let Some(state) = link.get(&name).await?
            && state.kind.as_deref() == Some("wireguard")
            && link.delete_exact(&name, state.index).await?
        {
            tracing::info!(component = "mesh", interface = %name, "removed the WireGuard interface");
        }
        Ok(())
    }

    async fn teardown(&mut self, link: &Link) -> Result<(), MeshError> {
        self.monitor = None;
        self.live.set(None);
        self.sync = DeviceSync::default();
        self.needs_read.store(true, Ordering::Release);
        routes::remove_all(link, &mut self.routes).await;
        if let Some(current) = self.current.take()
            && current.adopted
        {
            tracing::info!(component = "mesh", interface = %current.interface, "leaving the adopted WireGuard interface in place");
        }
        self.remove_created(link).await
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
        self.claim(wg, iface, chosen, link).await?;
        let backend = match chosen {
            Chosen::Kernel => Backend::Kernel,
            Chosen::Userspace => Backend::Userspace,
        };

        let key = keys::load_or_generate(&wg.private_key_file)?;
        let public = key.public();
        // A bad peer (unreadable preshared key, unsafe route) is skipped and reported, never
        // the mesh.
        let ours = link.get(iface).await?.map(|state| state.index);
        let mut plan = plan::plan(wg, &self.resolver, link.local_networks(ours).await?).await;
        // Gateway peers come third, after `peers` and `peers_dir`, which win on a collision.
        let gateway_note = self.gateway.as_ref().map(|gateway| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            crate::core::coord::client::add_gateway_peers(
                &mut plan.peers,
                &mut plan.names,
                &mut plan.problems,
                public,
                wg.mesh_cidr,
                gateway.shared.peers(now),
            );
            plan.problems.extend(gateway.shared.problems());
            gateway.shared.status_note()
        });
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
            gateway: self.gateway.as_ref().map(|g| Arc::clone(&g.shared)),
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
            gateway: gateway_note,
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
        services: &'a [ServiceAd],
    ) -> BoxFuture<'a, Result<(), MeshError>> {
        // Peers read this node's services from its node-info endpoint, which the shell runs;
        // a gateway also learns them from this node's advert, for one-request discovery.
        if let Some(gateway) = &self.gateway {
            gateway
                .shared
                .set_services(services.iter().map(|s| (s.name.clone(), s.port)).collect());
        }
        Box::pin(async { Ok(()) })
    }

    fn withdraw(&mut self) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async { Ok(()) })
    }

    fn leave(&mut self) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move {
            self.monitor = None;
            // The poll task stops; session and cache stay for the next start.
            self.gateway = None;
            self.live.set(None);
            self.hooks_live.set(None);
            if self.keep_interface {
                // A link whose creation a stop interrupted has no record yet: the next start
                // would refuse it as someone else's, so it goes even now.
                if self.creating.is_some() {
                    let link = self.link()?;
                    self.remove_half_made(&link).await?;
                }
                tracing::info!(
                    component = "mesh",
                    "keeping the WireGuard interface (keep_interface_on_stop = true)"
                );
                return Ok(());
            }
            let link = self.link()?;
            self.teardown(&link).await
        })
    }
}
