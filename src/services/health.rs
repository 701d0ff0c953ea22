//! The health-check probes: the I/O half of `core::health`. The core decides which check is
//! due and what a result means; this runs one probe and says what happened.
//!
//! Every probe is bounded by its timeout as a whole (connect, TLS and the response head
//! together), and an HTTP probe reads only the response head, never the body, with hyper's
//! smallest read buffer (8 KiB), so a misbehaving service cannot make a check slow or large.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::{CheckKind, HttpCheck, HttpsCheck};
use crate::core::health::CheckResult;

/// hyper's smallest read buffer; the response head must fit in it.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Run one check, never for longer than `timeout`.
pub async fn run_check(kind: &CheckKind, timeout: Duration) -> CheckResult {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, probe(kind)).await;
    let duration = started.elapsed();
    let (ok, detail) = match outcome {
        Ok(Ok(detail)) => (true, detail),
        Ok(Err(detail)) => (false, detail),
        Err(_) => (
            false,
            format!("timed out after {}", humantime::format_duration(timeout)),
        ),
    };
    CheckResult {
        ok,
        detail,
        duration,
    }
}

/// `Ok(detail)` when the service passed, `Err(detail)` when it did not.
async fn probe(kind: &CheckKind) -> Result<String, String> {
    match kind {
        CheckKind::None => Ok("not checked".into()),
        CheckKind::Tcp { target } => connect(*target).await.map(|_| "connected".into()),
        CheckKind::Http(check) => http(check).await,
    }
}

async fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    TcpStream::connect(target).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            "connect refused".into()
        } else {
            format!("connect: {}", io_detail(&e))
        }
    })
}

async fn http(check: &HttpCheck) -> Result<String, String> {
    let tcp = connect(check.target).await?;
    match &check.tls {
        None => {
            let host = host_header(&check.target.ip().to_string(), check.target.port(), 80);
            exchange(tcp, check, host).await
        }
        Some(tls) => {
            let name = ServerName::try_from(tls.server_name.clone())
                .map_err(|e| format!("TLS: server_name {:?}: {e}", tls.server_name))?;
            let connector = tokio_rustls::TlsConnector::from(client_config(tls).await?);
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {}", io_detail(&e)))?;
            let host = host_header(&tls.server_name, check.target.port(), 443);
            exchange(stream, check, host).await
        }
    }
}

/// `GET path` with `Connection: close`; only the status line and headers are read.
async fn exchange<S>(io: S, check: &HttpCheck, host: String) -> Result<String, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request = hyper::Request::get(check.path.as_str())
        .header(HOST, host)
        .header(CONNECTION, "close")
        .header(USER_AGENT, concat!("clawnode/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    // The connection is driven here, not spawned, so it ends with this probe: once the head
    // is in, both are dropped and the body is never read.
    let mut conn = std::pin::pin!(conn);
    let mut send = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        response = &mut send => response,
        ended = &mut conn => match ended {
            // A short response can end the connection before the head is handed over.
            Ok(()) => send.await,
            Err(e) => return Err(format!("HTTP: {}", crate::http::source_chain(&e))),
        },
    };
    let status = response
        .map_err(|e| format!("HTTP: {}", crate::http::source_chain(&e)))?
        .status()
        .as_u16();
    let (low, high) = check.expect;
    if (low..=high).contains(&status) {
        Ok(format!("HTTP {status}"))
    } else if low == high {
        Err(format!("HTTP {status} (expected {low})"))
    } else {
        Err(format!("HTTP {status} (expected {low}-{high})"))
    }
}

fn host_header(host: &str, port: u16, default_port: u16) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    if port == default_port {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// The error's kind in words where that says it all, else its message (a TLS alert, say).
fn io_detail(error: &std::io::Error) -> String {
    match error.get_ref() {
        Some(inner) => inner.to_string(),
        None if error.raw_os_error().is_some() => error.kind().to_string(),
        None => error.to_string(),
    }
}

/// The client config for `tls`. The verifying one is built once, from the system's roots.
async fn client_config(tls: &HttpsCheck) -> Result<Arc<rustls::ClientConfig>, String> {
    static VERIFIED: Verified = Verified::new();
    static UNVERIFIED: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if tls.skip_verify {
        return Ok(Arc::clone(UNVERIFIED.get_or_init(|| {
            let verifier = Arc::new(NoVerify(provider()));
            Arc::new(
                builder()
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth(),
            )
        })));
    }
    VERIFIED.get(verified_config).await
}

fn verified_config() -> Result<Arc<rustls::ClientConfig>, String> {
    use hyper_rustls::ConfigBuilderExt as _;
    builder()
        .with_native_roots()
        .map(|b| Arc::new(b.with_no_client_auth()))
        .map_err(|e| format!("TLS: no system roots: {e}"))
}

/// Loading the system's roots reads and parses every file in the trust store: blocking, so
/// it runs off the runtime, and too much to repeat every few seconds, so a success is kept.
/// A failure is not: the trust store may be fixed, and the next check tries again.
struct Verified(tokio::sync::OnceCell<Arc<rustls::ClientConfig>>);

impl Verified {
    const fn new() -> Self {
        Self(tokio::sync::OnceCell::const_new())
    }

    async fn get<F>(&self, load: F) -> Result<Arc<rustls::ClientConfig>, String>
    where
        F: FnOnce() -> Result<Arc<rustls::ClientConfig>, String> + Send + 'static,
    {
        self.0
            .get_or_try_init(|| async {
                tokio::task::spawn_blocking(load)
                    .await
                    .map_err(|e| format!("TLS: loading the system roots: {e}"))?
            })
            .await
            .cloned()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        // The ring provider supports the default versions; nothing else can fail here.
        .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"))
}

/// `tls_skip_verify`: any certificate is accepted (a self-signed local one is the point), but
/// the handshake's signatures are still checked, so the server must hold the cert's key.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::{CertificateParams, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);

    fn http(target: SocketAddr, tls: Option<HttpsCheck>) -> CheckKind {
        CheckKind::Http(HttpCheck {
            target,
            path: "/healthz".into(),
            expect: (200, 399),
            tls,
        })
    }

    /// A port nothing listens on: bound, then closed.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    /// A plain HTTP server that answers every request with `response` and records the
    /// request heads it read.
    async fn http_server(
        response: &'static [u8],
    ) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let head = read_head(&mut stream).await;
                    seen.lock().unwrap().push(head);
                    let _ = stream.write_all(response).await;
                });
            }
        });
        (addr, heads)
    }

    async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> String {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    /// A self-signed certificate for `localhost`, and a TLS server with it answering `response`.
    async fn https_server(response: &'static [u8]) -> SocketAddr {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    read_head(&mut tls).await;
                    let _ = tls.write_all(response).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_tcp_check_passes_when_something_listens_and_fails_refused_when_nothing_does() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let up = run_check(&CheckKind::Tcp { target }, TIMEOUT).await;
        assert!(up.ok, "{up:?}");
        assert_eq!(up.detail, "connected");
        assert!(up.duration < TIMEOUT);

        let target = closed_port().await;
        let down = run_check(&CheckKind::Tcp { target }, TIMEOUT).await;
        assert!(!down.ok);
        assert_eq!(down.detail, "connect refused");
    }

    #[tokio::test]
    async fn an_http_check_passes_on_a_status_in_range_and_names_the_status_otherwise() {
        let (ok, heads) = http_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let result = run_check(&http(ok, None), TIMEOUT).await;
        assert!(result.ok, "{result:?}");
        assert_eq!(result.detail, "HTTP 200");
        let head = heads.lock().unwrap()[0].to_ascii_lowercase();
        assert!(head.starts_with("get /healthz http/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("host: {ok}\r\n")), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");

        let (failing, _) =
            http_server(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n").await;
        let result = run_check(&http(failing, None), TIMEOUT).await;
        assert!(!result.ok);
        assert_eq!(result.detail, "HTTP 500 (expected 200-399)");

        let mut exact = http(ok, None);
        if let CheckKind::Http(check) = &mut exact {
            check.expect = (204, 204);
        }
        let result = run_check(&exact, TIMEOUT).await;
        assert_eq!(result.detail, "HTTP 200 (expected 204)");

        let result = run_check(&http(closed_port().await, None), TIMEOUT).await;
        assert_eq!(result.detail, "connect refused");
    }

    #[tokio::test]
    async fn an_http_check_reads_only_the_head_of_an_endless_response() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&sent);
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = [b'x'; 4096];
            loop {
                let frame = [b"1000\r\n".as_slice(), &chunk, b"\r\n"].concat();
                if stream.write_all(&frame).await.is_err() {
                    break;
                }
                counter.fetch_add(frame.len(), Ordering::SeqCst);
            }
        });
        let result = run_check(&http(addr, None), TIMEOUT).await;
        assert!(result.ok, "{result:?}");
        assert!(result.duration < Duration::from_millis(500), "{result:?}");
        // The server stops when the probe hangs up; what it wrote is at most the socket
        // buffers' worth, not a stream running until the timeout.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = sent.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(sent.load(Ordering::SeqCst), before, "the probe hung up");
    }

    #[tokio::test]
    async fn a_service_that_accepts_and_never_answers_times_out_within_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts, then holds the connection without a byte.
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                held.push(stream);
            }
        });
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let result = run_check(&http(addr, None), timeout).await;
        let took = started.elapsed();
        assert!(!result.ok);
        assert_eq!(result.detail, "timed out after 300ms");
        assert!(
            took >= timeout && took < timeout + Duration::from_millis(200),
            "{took:?}"
        );
        let tls = Some(HttpsCheck {
            skip_verify: true,
            server_name: "localhost".into(),
        });
        let result = run_check(&http(addr, tls), timeout).await;
        assert_eq!(result.detail, "timed out after 300ms");
    }

    #[tokio::test]
    async fn an_https_check_on_a_self_signed_cert_fails_verification_unless_told_to_skip_it() {
        let addr = https_server(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let verified = Some(HttpsCheck {
            skip_verify: false,
            server_name: "localhost".into(),
        });
        let result = run_check(&http(addr, verified), TIMEOUT).await;
        assert!(!result.ok);
        assert!(
            result.detail.starts_with("TLS: ") && result.detail.contains("certificate"),
            "{result:?}"
        );

        let skipped = Some(HttpsCheck {
            skip_verify: true,
            server_name: "localhost".into(),
        });
        let result = run_check(&http(addr, skipped), TIMEOUT).await;
        assert!(result.ok, "{result:?}");
        assert_eq!(result.detail, "HTTP 200");

        // Plain HTTP to a TLS port gets no HTTP answer.
        let result = run_check(&http(addr, None), Duration::from_millis(500)).await;
        assert!(!result.ok, "{result:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn system_roots_load_off_the_runtime_and_a_failed_load_is_tried_again() {
        let verified = Verified::new();
        let loads = Arc::new(AtomicUsize::new(0));
        let threads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let load = |fail: bool| {
            let (loads, threads) = (Arc::clone(&loads), Arc::clone(&threads));
            move || {
                loads.fetch_add(1, Ordering::SeqCst);
                threads.lock().unwrap().push(std::thread::current().id());
                if fail {
                    return Err("TLS: no system roots: empty trust store".to_string());
                }
                Ok(Arc::new(
                    builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                ))
            }
        };
        assert!(verified.get(load(true)).await.is_err());
        assert!(verified.get(load(false)).await.is_ok(), "retried");
        assert!(verified.get(load(true)).await.is_ok(), "kept once loaded");
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        let runtime = std::thread::current().id();
        assert!(
            threads.lock().unwrap().iter().all(|t| *t != runtime),
            "loaded on the runtime's thread"
        );
    }
}
