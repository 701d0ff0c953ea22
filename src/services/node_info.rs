//! The read-only node-info endpoint, `GET /v1/node`, served on the node's mesh address only.
//!
//! The socket is bound to the mesh address *and* to the mesh interface (SO_BINDTODEVICE):
//! Linux accepts packets for a local address on any interface, so the address alone would let
//! a neighbour on the LAN reach it. A caller is identified by its tunnel source address, which
//! the tunnel authenticated: with WireGuard it must lie in the mesh CIDR, with Tailscale
//! tailscaled's `whois` must know it as a tailnet node.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

use crate::core::gpu::{self, GpuSummary};
use crate::mesh::ServiceAd;
use crate::mesh::tailscale::localapi::LocalApi;

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

pub type SharedInfo = Arc<RwLock<NodeInfo>>;

/// Who may read the endpoint.
#[derive(Clone)]
pub enum Callers {
    /// Sources inside the WireGuard mesh CIDR.
    Cidr(IpNet),
    /// Sources that tailscaled's `whois` knows as tailnet nodes.
    Tailnet(LocalApi),
}

impl Callers {
    async fn allows(&self, peer: SocketAddr) -> bool {
        match self {
            Callers::Cidr(mesh) => mesh.contains(&peer.ip()),
            Callers::Tailnet(api) => api
                .get(&format!("/localapi/v0/whois?addr={peer}"))
                .await
                .is_ok(),
        }
    }
}

/// The interface that holds `addr`, for SO_BINDTODEVICE; `None` when no interface has it
/// (tailscaled in userspace-networking mode has no address of its own on the host).
pub fn interface_with(addr: IpAddr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let sock = ifa.address?;
        let found = match addr {
            IpAddr::V4(v4) => sock.as_sockaddr_in().map(|s| s.ip()) == Some(v4),
            IpAddr::V6(v6) => sock.as_sockaddr_in6().map(|s| s.ip()) == Some(v6),
        };
        found.then_some(ifa.interface_name)
    })
}

pub struct Server {
    pub addr: SocketAddr,
    pub interface: String,
    task: JoinHandle<()>,
}

impl Server {
    /// Listen on `addr`, on `interface` only, answering `callers`.
    pub fn start(
        interface: &str,
        addr: SocketAddr,
        callers: Callers,
        info: SharedInfo,
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
        let task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::warn!(component = "services", %error, "node-info accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let info = Arc::clone(&info);
                let gpus = Arc::clone(&gpus);
                let callers = callers.clone();
                tokio::spawn(async move {
                    if !callers.allows(peer).await {
                        tracing::warn!(component = "services", %peer, "refused a node-info caller outside the mesh");
                        return;
                    }
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let info = Arc::clone(&info);
                        let gpus = Arc::clone(&gpus);
                        async move { Ok::<_, Infallible>(route(&req, &info, &gpus)) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
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
    info: &SharedInfo,
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
