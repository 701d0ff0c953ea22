//! `clawnode services discover <name>`: ask every peer's node-info endpoint over the mesh, a
//! bounded number at a time, each with its own timeout, and list the nodes offering `name`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use super::node_info::NodeInfo;
use crate::http::source_chain;

/// At most this many peers are asked at once, so a 1,000-node mesh is not hit all together.
pub const CONCURRENCY: usize = 32;
pub const PER_PEER_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize)]
pub struct Provider {
    pub node: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unreachable {
    pub address: IpAddr,
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Discovery {
    pub providers: Vec<Provider>,
    pub unreachable: Vec<Unreachable>,
}

/// Query `targets` (mesh address of each peer) on `port` for nodes advertising `service`.
pub async fn discover(targets: Vec<IpAddr>, port: u16, service: &str) -> Discovery {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let results: Vec<(IpAddr, Result<NodeInfo, String>)> = futures::stream::iter(targets)
        .map(|ip| {
            let client = client.clone();
            async move {
                let uri = format!("http://{}/v1/node", SocketAddr::new(ip, port));
                let call = async {
                    let uri: hyper::Uri = uri.parse().map_err(|e| format!("{e}"))?;
                    let resp = client.get(uri).await.map_err(|e| source_chain(&e))?;
                    if !resp.status().is_success() {
                        return Err(format!("HTTP {}", resp.status()));
                    }
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?
                        .to_bytes();
                    serde_json::from_slice::<NodeInfo>(&body).map_err(|e| e.to_string())
                };
                let result = tokio::time::timeout(PER_PEER_TIMEOUT, call)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {PER_PEER_TIMEOUT:?}")));
                (ip, result)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut out = Discovery::default();
    for (address, result) in results {
        match result {
            Ok(info) => {
                out.providers
                    .extend(
                        info.services
                            .into_iter()
                            .filter(|s| s.name == service)
                            .map(|s| Provider {
                                node: info.name.clone(),
                                address,
                                port: s.port,
                                protocol: s.protocol,
                            }),
                    )
            }
            Err(error) => out.unreachable.push(Unreachable { address, error }),
        }
    }
    out.providers.sort_by(|a, b| a.node.cmp(&b.node));
    out.unreachable.sort_by_key(|u| u.address);
    out
}
