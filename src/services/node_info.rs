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
        if let Some(server) = &self.server
            && server.addr == spot.listen
            && server.interface == spot.interface
        {
            // Who may call can change without a rebind (a new mesh_cidr); the next connection
            // is checked against the new rule.
            *server.callers.write().unwrap_or_else(|p| p.into_inner()) = spot.callers.clone();
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
    callers: Arc<RwLock<Callers>>,
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
        let callers = Arc::new(RwLock::new(callers));
        let rule = Arc::clone(&callers);
        let task = tokio::spawn(crate::http::accept_loop(
            "services",
            listener,
            limits,
            move |stream, peer: SocketAddr, slot| {
                let info = Arc::clone(&info);
                let gpus = Arc::clone(&gpus);
                let callers = rule.read().unwrap_or_else(|p| p.into_inner()).clone();
                async move {
                    // Only now, within the connection caps, may a caller cost a `whois`.
                    let allowed = tokio::time::timeout(limits.deadline, callers.allows(peer)).await;
                    if !allowed.unwrap_or(false) {
                        tracing::warn!(component = "services", %peer, "refused a node-info caller outside the mesh");
                        return;
                    }
                    if slot.head_in("services", &stream, limits).await {
                        // Boxed, so a connection that is still waiting carries none of hyper's state.
                        Box::pin(answer(stream, info, gpus, limits)).await;
                    }
                }
            },
        ));
        Ok(Server {
            addr,
            interface: interface.to_string(),
            callers,
            task,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answer one request on an accepted connection from an allowed caller, within `limits`.
pub async fn answer<I>(io: I, info: Arc<RwLock<NodeInfo>>, gpus: crate::gpu::Shared, limits: Limits)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let info = Arc::clone(&info);
        let gpus = Arc::clone(&gpus);
        async move { Ok::<_, Infallible>(route(&req, &info, &gpus)) }
    });
    crate::http::serve_one("services", io, service, limits).await;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get_node(addr: SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /v1/node HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
            .await
            .expect("answered or closed");
        reply
    }

    #[tokio::test]
    async fn a_new_mesh_cidr_changes_who_may_call_without_a_rebind() {
        // SO_BINDTODEVICE needs CAP_NET_RAW; without it there is nothing to test here.
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for SO_BINDTODEVICE");
            return;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let spot = |cidr: &str| NodeInfoSpot {
            interface: "lo".into(),
            listen,
            public_key: "key".into(),
            callers: Callers::Within(cidr.parse().unwrap()),
            essential: true,
        };
        let mut endpoint = NodeInfoEndpoint::new(crate::gpu::Shared::default());
        endpoint
            .place("gpu-01", Some(&spot("10.100.0.0/16")))
            .unwrap();
        assert_eq!(get_node(listen).await, "", "127.0.0.1 is outside the mesh");
        endpoint
            .place("gpu-01", Some(&spot("127.0.0.0/8")))
            .unwrap();
        let reply = get_node(listen).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("\"name\":\"gpu-01\""), "{reply}");
    }
}
