//! The mesh boundary: one trait that both mesh modes implement.
//!
//! `wireguard` (self-hosted, issue 3) and `tailscale` (managed, issue 4) will live beside this
//! file and never import each other; shared needs belong here or in `core`.

#[cfg(feature = "test-fakes")]
pub mod fake;
pub mod tailscale;
pub mod wireguard;

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::config::{Config, ProviderKind, ServiceMode};

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

/// What the node looks like on the mesh once joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStatus {
    pub provider: String,
    pub interface: Option<String>,
    pub address: Option<String>,
    pub peers: usize,
    /// Things the operator should fix that did not stop the join (a rejected peer file).
    #[serde(default)]
    pub problems: Vec<String>,
}

impl MeshStatus {
    /// "wireguard claw0 10.100.0.5/16": the mesh part of the STATUS= line.
    pub fn summary(&self) -> String {
        let mut parts = vec![self.provider.clone()];
        parts.extend(self.interface.clone());
        parts.extend(self.address.clone());
        parts.join(" ")
    }
}

/// A service as the mesh advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAd {
    pub name: String,
    pub port: u16,
    /// "tcp", "http" or "https".
    pub protocol: String,
}

impl ServiceAd {
    pub fn from_config(config: &Config) -> Vec<ServiceAd> {
        config
            .services
            .iter()
            .map(|(name, spec)| ServiceAd {
                name: name.to_string(),
                port: spec.port,
                protocol: match spec.mode {
                    ServiceMode::Tcp => "tcp",
                    ServiceMode::Http { tls: true } => "https",
                    ServiceMode::Http { tls: false } => "http",
                }
                .to_string(),
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{0}")]
    Failed(String),
}

/// A way of putting this node on a mesh and advertising its services there.
///
/// Every method is idempotent: the supervisor calls `join` again after any failure and after a
/// reload that touched the network settings, and `publish` again whenever the mesh comes back.
pub trait MeshProvider: Send {
    fn kind(&self) -> &'static str;

    /// Bring the node onto the mesh described by `config`, or confirm that it already is.
    fn join<'a>(&'a mut self, config: &'a Config) -> BoxFuture<'a, Result<MeshStatus, MeshError>>;

    /// Advertise exactly these services (an empty list advertises none).
    fn publish<'a>(&'a mut self, services: &'a [ServiceAd])
    -> BoxFuture<'a, Result<(), MeshError>>;

    /// Withdraw every advertisement this node made, before it stops.
    fn withdraw(&mut self) -> BoxFuture<'_, Result<(), MeshError>>;

    /// Leave the mesh (after `withdraw`): tear down what `join` set up, where the provider owns it.
    fn leave(&mut self) -> BoxFuture<'_, Result<(), MeshError>>;
}

/// What the rest of clawnode hands a provider: how to ask for a recheck, and where to publish
/// the interface that the status API reads live.
#[derive(Clone)]
pub struct Hooks {
    pub recheck: Recheck,
    pub live: Live,
    /// The GPU monitor's latest snapshot, for the node-info endpoint.
    pub gpus: crate::gpu::Shared,
}

/// What the status API reads at request time, filled in by whichever provider runs.
#[derive(Clone, Default)]
pub struct Live {
    pub wireguard: wireguard::status::LiveTarget,
    pub tailscale: tailscale::status::LiveTailscale,
}

impl Hooks {
    pub fn new() -> (Hooks, tokio::sync::mpsc::Receiver<String>) {
        let (recheck, rx) = Recheck::channel();
        let hooks = Hooks {
            recheck,
            live: Live::default(),
            gpus: crate::gpu::Shared::default(),
        };
        (hooks, rx)
    }
}

/// The provider that `[network] provider` selects.
pub fn for_config(config: &Config, hooks: Hooks) -> Box<dyn MeshProvider> {
    match config.network.provider {
        ProviderKind::Wireguard => Box::new(wireguard::WireguardMesh::new(hooks)),
        ProviderKind::Tailscale => Box::new(tailscale::TailscaleMesh::new(hooks)),
        #[cfg(feature = "test-fakes")]
        ProviderKind::Fake => Box::new(fake::FakeMesh::default()),
    }
}
