//! The read-only node-info endpoint, `GET /v1/node`, served on the node's mesh address only.
//!
//! The shell owns it: the mesh provider says where it should listen and who may call
//! (`mesh::NodeInfoSpot`), and this component binds there, rebinds when the spot moves, and
//! fills in the node's services and a GPU summary at request time.
//!
//! The socket is bound to the mesh address *and* to the mesh interface (SO_BINDTODEVICE):
//! Linux accepts packets for a local address on any interface, so the address alone would let
//! a neighbour on the LAN reach it. A caller is identified by its tunnel source address, which
//! the tunnel authenticated.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

use crate::core::gpu::{self, GpuSummary};
use crate::core::model::ServiceAd;
use crate::http::Limits;
use crate::mesh::{Callers, NodeInfoSpot};

/// What a node tells the mesh about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub public_key: String,
    pub address: String,
    pub services: Vec<ServiceAd>,
    /// One entry per GPU model, with free memory from the last sample: filled in per request.
    pub gpus: Vec<GpuSummary>,
}

/// The endpoint as a component: where it listens, and what it says.
pub struct NodeInfoEndpoint {
    info: Arc<RwLock<NodeInfo>>,
    gpus: crate::gpu::Shared,
    server: Option<Server>,
}

impl NodeInfoEndpoint {
    pub fn new(gpus: crate::gpu::Shared) -> Self {
        Self {
            info: Arc::default(),
            gpus,
            server: None,
        }
    }

    /// Serve as `name` at `spot`; `None` stops serving. The socket is rebound only when the
    /// interface or address moved, so a rejoin that changed nothing keeps connections alive.
    pub fn place(&mut self, name: &str, spot: Option<&NodeInfoSpot>) -> std::io::Result<()> {
        let Some(spot) = spot else {
            self.server = None;
            return Ok(());
        };
        {
            let mut info = self.info.write().unwrap_or_else(|p| p.into_inner());
            info.name = name.to_string();
            info.public_key = spot.public_key.clone();
            info.address = spot.listen.ip().to_string();
        }
        let current = self
            .server
            .as_ref()
            .is_some_and(|s| s.addr == spot.listen && s.interface == spot.interface);
        if current {
            return Ok(());
        }
        self.server = None;
        self.server = Some(Server::start(
            &spot.interface,
            spot.listen,
            spot.callers.clone(),
            Arc::clone(&self.info),
            self.gpus.clone(),
        )?);
        Ok(())
    }

    /// The services the mesh provider now advertises.
    pub fn set_services(&self, services: &[ServiceAd]) {
        self.info
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .services = services.to_vec();
    }

    /// Withdraw: list no services and stop listening.
    pub fn stop(&mut self) {
        self.set_services(&[]);
        self.server = None;
    }
}

struct Server {
    addr: SocketAddr,
    interface: String,
    task: JoinHandle<()>,
}

impl Server {
    /// Listen on `addr`, on `interface` only, answering `callers`.
    fn start(
        interface: &str,
        addr: SocketAddr,
        callers: Callers,
        info: Arc<RwLock<NodeInfo>>,
        gpus: crate::gpu::Shared,
    ) -> std::io::Result<Server> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind_device(Some(interface.as_bytes()))?;
        socket.bind(addr)?;
        let listener = socket.listen(64)?;
        tracing::info!(component = "services", interface, %addr, "node-info endpoint listening");
        let limits = Limits::PEERS;
        let task = tokio::spawn(crate::http::accept_loop(
            "services",
            listener,
            limits,
            move |stream, peer: SocketAddr, slot| {
                let info = Arc::clone(&info);
                let gpus = Arc::clone(&gpus);
                let callers = callers.clone();
                async move {
                    let _slot = slot;
                    // Only now, within the connection caps, may a caller cost a `whois`.
                    let allowed = tokio::time::timeout(limits.deadline, callers.allows(peer)).await;
                    if !allowed.unwrap_or(false) {
                        tracing::warn!(component = "services", %peer, "refused a node-info caller outside the mesh");
                        return;
                    }
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let info = Arc::clone(&info);
                        let gpus = Arc::clone(&gpus);
                        async move { Ok::<_, Infallible>(route(&req, &info, &gpus)) }
                    });
                    crate::http::serve_one("services", stream, service, limits).await;
                }
            },
        ));
        Ok(Server {
            addr,
            interface: interface.to_string(),
            task,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn route(
    req: &hyper::Request<hyper::body::Incoming>,
    info: &RwLock<NodeInfo>,
    gpus: &crate::gpu::Shared,
) -> Response<Full<Bytes>> {
    let (code, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/node") => {
            let mut info = info.read().unwrap_or_else(|p| p.into_inner()).clone();
            let snapshot = gpus.read().unwrap_or_else(|p| p.into_inner());
            info.gpus = gpu::summarize(&snapshot.inventory, &snapshot.metrics);
            match serde_json::to_vec(&info) {
                Ok(body) => (StatusCode::OK, body),
                Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, b"{}".to_vec()),
            }
        }
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            br#"{"error":"no such endpoint"}"#.to_vec(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            br#"{"error":"read-only endpoint"}"#.to_vec(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
