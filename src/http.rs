//! HTTP plumbing shared by every endpoint and client: one accept loop, the outbound HTTPS
//! client, and error chains that name the cause.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

/// A listening socket the accept loop can serve.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Addr: Send + 'static;

    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl Listener for TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        self.accept()
    }
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        self.accept()
    }
}

/// Accept connections until the task is dropped, one task per connection. An accept error
/// (EMFILE and friends) is logged and survived after a short pause: spinning on it would burn
/// a core, and ending the loop would take the endpoint down for good.
pub async fn accept_loop<L, F, Fut>(component: &'static str, listener: L, handle: F)
where
    L: Listener,
    F: Fn(L::Io, L::Addr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept_one().await {
            Ok((io, addr)) => {
                tokio::spawn(handle(io, addr));
            }
            Err(error) => {
                tracing::warn!(component, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The outbound client: HTTPS with the system's roots through rustls, plain HTTP where the
/// caller allows it.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub fn https_client() -> io::Result<HttpsClient> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| io::Error::other(format!("no TLS roots: {e}")))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// hyper's client errors say "client error (Connect)"; the cause underneath is what helps.
pub fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
