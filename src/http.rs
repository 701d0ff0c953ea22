//! HTTP plumbing shared by every endpoint and client: one accept loop and one connection
//! server, both with limits (connections, per-source connections, time, bytes), the outbound
//! HTTPS client, and error chains that name the cause.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What one endpoint allows: how many connections, from whom, for how long, how big.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; the next is closed at accept, before anything is read.
    pub max_connections: usize,
    /// Connections open at once from one source address (TCP only).
    pub max_per_source: usize,
    /// The request head must arrive within this (hyper closes a slow or idle connection).
    pub header_timeout: Duration,
    /// The whole exchange, head to response, must end within this.
    pub deadline: Duration,
    /// The read buffer, which bounds the request head (hyper's minimum is 8 KiB).
    pub max_request_bytes: usize,
}

impl Limits {
    /// Endpoints other nodes reach (node-info, `metrics_listen`): a few callers, small requests.
    pub const PEERS: Limits = Limits {
        max_connections: 256,
        max_per_source: 8,
        header_timeout: Duration::from_secs(5),
        deadline: Duration::from_secs(10),
        max_request_bytes: 16 * 1024,
    };

    /// The status API's Unix socket: only local root (or `socket_group`) can connect.
    pub const LOCAL: Limits = Limits {
        max_connections: 64,
        max_per_source: 64,
        header_timeout: Duration::from_secs(5),
        deadline: Duration::from_secs(30),
        max_request_bytes: 16 * 1024,
    };
}

/// A listening socket the accept loop can serve.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Addr: Send + 'static;

    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;

    /// The address a per-source cap counts by; `None` where there is none (a Unix socket).
    fn source(addr: &Self::Addr) -> Option<IpAddr>;
}

impl Listener for TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        self.accept()
    }

    fn source(addr: &Self::Addr) -> Option<IpAddr> {
        Some(addr.ip())
    }
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        self.accept()
    }

    fn source(_: &Self::Addr) -> Option<IpAddr> {
        None
    }
}

/// Open connections per source address.
type PerSource = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Held by a connection's task; gives its slots back when the connection ends.
pub struct Slot {
    _global: OwnedSemaphorePermit,
    source: Option<(IpAddr, PerSource)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some((ip, sources)) = self.source.take() else {
            return;
        };
        let mut sources = sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = sources.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                sources.remove(&ip);
            }
        }
    }
}

/// Accept connections until the task is dropped, one task per connection. A connection over
/// `limits` (all slots taken, or its source's) is closed at once, before `handle` runs, so it
/// costs no read and no lookup. An accept error (EMFILE and friends) is logged and survived
/// after a short pause: spinning on it would burn a core, and ending the loop would take the
/// endpoint down for good.
pub async fn accept_loop<L, F, Fut>(component: &'static str, listener: L, limits: Limits, handle: F)
where
    L: Listener,
    F: Fn(L::Io, L::Addr, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let global = Arc::new(Semaphore::new(limits.max_connections));
    let sources: PerSource = Arc::default();
    let mut refused = 0u64;
    loop {
        let (io, addr) = match listener.accept_one().await {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(component, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = take_slot(&global, &sources, L::source(&addr), limits) else {
            refused += 1;
            // Once per power of two, so a flood cannot flood the journal too.
            if refused.is_power_of_two() {
                tracing::warn!(
                    component,
                    refused,
                    "connection limit reached; closing new connections"
                );
            }
            drop(io);
            continue;
        };
        tokio::spawn(handle(io, addr, slot));
    }
}

fn take_slot(
    global: &Arc<Semaphore>,
    sources: &PerSource,
    source: Option<IpAddr>,
    limits: Limits,
) -> Option<Slot> {
    let permit = Arc::clone(global).try_acquire_owned().ok()?;
    let Some(ip) = source else {
        return Some(Slot {
            _global: permit,
            source: None,
        });
    };
    let mut counts = sources.lock().unwrap_or_else(|p| p.into_inner());
    let count = counts.entry(ip).or_insert(0);
    if *count >= limits.max_per_source {
        return None;
    }
    *count += 1;
    Some(Slot {
        _global: permit,
        source: Some((ip, Arc::clone(sources))),
    })
}

/// Serve one HTTP/1 exchange on `io` within `limits`: the head must arrive in time and fit the
/// buffer, the connection is not kept alive, and the whole exchange has a deadline.
pub async fn serve_one<I, S>(component: &'static str, io: I, service: S, limits: Limits)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false)
        .max_buf_size(limits.max_request_bytes.max(8 * 1024));
    let exchange = builder.serve_connection(TokioIo::new(io), service);
    match tokio::time::timeout(limits.deadline, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(component, %error, "connection ended with an error"),
        Err(_) => tracing::debug!(component, "connection closed at its deadline"),
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    use super::*;

    const TEST: Limits = Limits {
        max_connections: 3,
        max_per_source: 2,
        header_timeout: Duration::from_millis(300),
        deadline: Duration::from_secs(5),
        max_request_bytes: 8 * 1024,
    };

    /// A server whose handler counts the connections it is given and holds each until the
    /// client hangs up.
    async fn holding_server(limits: Limits) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handled = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&handled);
        tokio::spawn(accept_loop(
            "test",
            listener,
            limits,
            move |mut io, _, slot| {
                count.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _slot = slot;
                    let mut buf = [0u8; 1];
                    let _ = io.read(&mut buf).await;
                }
            },
        ));
        (addr, handled)
    }

    async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(to).await.unwrap()
    }

    async fn wait_for(handled: &AtomicUsize, n: usize) {
        while handled.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Closed by the server without a byte: read sees end of file.
    async fn closed_at_once(mut stream: TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn a_source_over_its_cap_is_closed_before_it_is_handled_and_others_still_get_in() {
        let (addr, handled) = holding_server(TEST).await;
        let _a = connect_from("127.0.0.1", addr).await;
        let _b = connect_from("127.0.0.1", addr).await;
        wait_for(&handled, 2).await;
        let third = connect_from("127.0.0.1", addr).await;
        assert!(
            closed_at_once(third).await,
            "a third connection from one source"
        );
        assert_eq!(
            handled.load(Ordering::SeqCst),
            2,
            "never handed to the handler"
        );
        let _other = connect_from("127.0.0.2", addr).await;
        wait_for(&handled, 3).await;
    }

    #[tokio::test]
    async fn the_global_cap_holds_across_sources_and_a_closed_connection_frees_its_slot() {
        let (addr, handled) = holding_server(TEST).await;
        let a = connect_from("127.0.0.1", addr).await;
        let _b = connect_from("127.0.0.2", addr).await;
        let _c = connect_from("127.0.0.3", addr).await;
        wait_for(&handled, 3).await;
        let fourth = connect_from("127.0.0.4", addr).await;
        assert!(closed_at_once(fourth).await, "over the global cap");
        drop(a);
        // The slot comes back once the handler sees the hang-up; retry until it has.
        loop {
            let next = connect_from("127.0.0.4", addr).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if handled.load(Ordering::SeqCst) == 4 {
                drop(next);
                break;
            }
        }
    }

    async fn http_server(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(accept_loop(
            "test",
            listener,
            limits,
            move |io, _, slot| async move {
                let _slot = slot;
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        "ok",
                    ))))
                });
                serve_one("test", io, service, limits).await;
            },
        ));
        addr
    }

    #[tokio::test]
    async fn a_request_head_that_never_finishes_is_cut_off_at_the_header_timeout() {
        let addr = http_server(TEST).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut reply))
            .await
            .expect("the server hangs up on a slow head");
        assert!(read.is_ok() || reply.is_empty());
        assert!(!String::from_utf8_lossy(&reply).contains("200 OK"));
    }

    #[tokio::test]
    async fn a_connection_serves_one_request_and_is_not_kept_alive() {
        let addr = http_server(TEST).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
            .await
            .expect("closed after one response")
            .unwrap();
        assert_eq!(reply.matches("HTTP/1.1 200").count(), 1, "{reply}");
        assert!(
            reply.to_ascii_lowercase().contains("connection: close"),
            "{reply}"
        );
    }

    #[tokio::test]
    async fn a_request_head_larger_than_the_buffer_is_refused() {
        let addr = http_server(TEST).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let huge = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Fill: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let _ = stream.write_all(huge.as_bytes()).await;
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply)).await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(!reply.contains("200 OK"), "{reply}");
    }
}
