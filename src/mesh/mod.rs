//! The mesh boundary: one trait that both mesh modes implement.
//!
//! `wireguard` (self-hosted) and `tailscale` (managed) live beside this file and never import
//! each other nor `services`; shared needs belong here, in `core` or in `http`. A provider says
//! where the node-info endpoint should listen and who may call it; the shell's `services`
//! component runs it.

#[cfg(feature = "test-fakes")]
pub mod fake;
pub mod live;
pub mod tailscale;
pub mod wireguard;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;

use crate::config::Config;
pub use crate::core::Retry;
pub use crate::core::model::{MeshStatus, ServiceAd};
pub use live::{LiveStatus, TunnelPeer};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a provider asks the supervisor to run `join` again because something changed outside
/// clawnode (an interface deleted, a daemon died) or a periodic check is due.
#[derive(Debug, Clone)]
pub struct Recheck(tokio::sync::mpsc::Sender<String>);

impl Recheck {
    /// A channel that holds one pending request: more requests before it is handled add nothing,
    /// so a burst of events costs one recheck and no memory.
    pub fn channel() -> (Recheck, tokio::sync::mpsc::Receiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (Recheck(tx), rx)
    }

    pub fn request(&self, reason: impl Into<String>) {
        let _ = self.0.try_send(reason.into());
    }
}

/// Why a mesh operation failed, and whether trying again can help (transient, or waiting for
/// the operator). The providers convert their typed errors into it with `From`.
pub type MeshError = crate::core::Failure;

/// What a successful `join` hands back: how the node looks on the mesh, and where the shell
/// should serve node-info (`None`: nowhere, for now).
#[derive(Debug, Clone)]
pub struct Joined {
    pub status: MeshStatus,
    pub node_info: Option<NodeInfoSpot>,
}

/// Where and for whom the node-info endpoint listens, as the provider that owns the mesh
/// interface decides it.
#[derive(Debug, Clone)]
pub struct NodeInfoSpot {
    /// The socket is bound to this interface (SO_BINDTODEVICE) as well as to `listen`.
    pub interface: String,
    pub listen: SocketAddr,
    /// This node's key on the mesh, as peers know it.
    pub public_key: String,
    pub callers: Callers,
    /// WireGuard peers learn the node's services only here, so without the endpoint the join
    /// has failed; on a tailnet it is extra, and a failure to listen is only a problem.
    pub essential: bool,
}

/// Who may read the node-info endpoint. Checked before a request is read.
#[derive(Clone)]
pub enum Callers {
    /// Sources inside this network (the WireGuard mesh CIDR, which the tunnel authenticated).
    Within(IpNet),
    /// Sources the mesh itself vouches for (tailscaled's `whois`).
    Vouched(Arc<dyn Voucher>),
}

impl std::fmt::Debug for Callers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Callers::Within(net) => write!(f, "Within({net})"),
            Callers::Vouched(_) => f.write_str("Vouched"),
        }
    }
}

impl Callers {
    pub async fn allows(&self, peer: SocketAddr) -> bool {
        match self {
            Callers::Within(net) => net.contains(&peer.ip()),
            Callers::Vouched(voucher) => voucher.vouches_for(peer).await,
        }
    }
}

/// A mesh that can say whether a source address belongs to one of its nodes.
pub trait Voucher: Send + Sync {
    fn vouches_for(&self, peer: SocketAddr) -> BoxFuture<'_, bool>;
}

/// A way of putting this node on a mesh and advertising its services there.
///
/// Every method is idempotent: the supervisor calls `join` again after any failure and after a
/// reload that touched the network settings, and `publish` again whenever the mesh comes back.
pub trait MeshProvider: Send {
    /// Bring the node onto the mesh described by `config`, or confirm that it already is.
    fn join<'a>(&'a mut self, config: &'a Config) -> BoxFuture<'a, Result<Joined, MeshError>>;

    /// Advertise exactly these services (an empty list advertises none).
    fn publish<'a>(&'a mut self, services: &'a [ServiceAd])
    -> BoxFuture<'a, Result<(), MeshError>>;

    /// Withdraw every advertisement this node made, before it stops.
    fn withdraw(&mut self) -> BoxFuture<'_, Result<(), MeshError>>;

    /// Leave the mesh (after `withdraw`): tear down what `join` set up, where the provider owns it.
    fn leave(&mut self) -> BoxFuture<'_, Result<(), MeshError>>;
}

/// What the rest of clawnode hands a provider: how to ask for a recheck, and where to register
/// the live view that the status API reads.
#[derive(Clone)]
pub struct Hooks {
    pub recheck: Recheck,
    pub live: Live,
    /// The GPU summary a coordinated mesh advertises, as the shell last set it.
    pub gpus: GpuSummaryCell,
}

/// (count, model, memory MiB) of this node's GPUs, from the shell to a provider that tells a
/// coordinator about them; plain numbers, so the mesh needs no GPU types.
#[derive(Clone)]
pub struct GpuSummaryCell(Arc<tokio::sync::watch::Sender<Option<(u32, String, u64)>>>);

impl Default for GpuSummaryCell {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(None)))
    }
}

impl GpuSummaryCell {
    /// Set the summary; readers wake only if it changed.
    pub fn set(&self, summary: Option<(u32, String, u64)>) {
        self.0.send_if_modified(|current| {
            let changed = *current != summary;
            *current = summary;
            changed
        });
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<(u32, String, u64)>> {
        self.0.subscribe()
    }
}

impl Hooks {
    pub fn new() -> (Hooks, tokio::sync::mpsc::Receiver<String>) {
        let (recheck, rx) = Recheck::channel();
        let hooks = Hooks {
            recheck,
            live: Live::default(),
            gpus: GpuSummaryCell::default(),
        };
        (hooks, rx)
    }
}

/// A provider's live view: read on demand, never polled.
pub trait LiveSource: Send + Sync {
    /// `None` when there is nothing to read (not joined, or the device is gone).
    fn read(&self) -> BoxFuture<'_, Option<LiveStatus>>;
}

/// Where the running provider registers its live view; the status API reads through it.
#[derive(Clone, Default)]
pub struct Live(Arc<RwLock<Option<Arc<dyn LiveSource>>>>);

impl Live {
    pub fn set(&self, source: Option<Arc<dyn LiveSource>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = source;
    }

    pub async fn read(&self) -> Option<LiveStatus> {
        let source = self.0.read().unwrap_or_else(|p| p.into_inner()).clone()?;
        source.read().await
    }
}

/// The interface that holds `addr`, for SO_BINDTODEVICE; `None` when no interface has it
/// (tailscaled in userspace-networking mode has no address of its own on the host).
pub fn interface_with(addr: std::net::IpAddr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let sock = ifa.address?;
        let found = match addr {
            std::net::IpAddr::V4(v4) => sock.as_sockaddr_in().map(|s| s.ip()) == Some(v4),
            std::net::IpAddr::V6(v6) => sock.as_sockaddr_in6().map(|s| s.ip()) == Some(v6),
        };
        found.then_some(ifa.interface_name)
    })
}
