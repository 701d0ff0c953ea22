//! The client side, used by `clawnode status`: hyperlocal over the daemon's socket.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};

use crate::http::source_chain;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach clawnode at {socket}: {reason} (is the daemon running?)")]
    Unreachable { socket: String, reason: String },
    #[error("clawnode at {socket} did not answer within {seconds} s")]
    Timeout { socket: String, seconds: u64 },
}

/// A response: status code and body.
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

/// GET `path` from the daemon listening on `socket`.
pub async fn get(socket: &Path, path: &str, timeout: Duration) -> Result<Reply, ClientError> {
    let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
    let uri: hyper::Uri = hyperlocal::Uri::new(socket, path).into();
    let unreachable = |reason: String| ClientError::Unreachable {
        socket: socket.display().to_string(),
        reason,
    };
    let call = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| unreachable(source_chain(&e)))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok(Reply { status, body })
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| ClientError::Timeout {
            socket: socket.display().to_string(),
            seconds: timeout.as_secs(),
        })?
}
