//! The server side of the status API: the document the supervisor publishes, plus what is read
//! at request time (the mesh's live view, GPU readings and XID counts).

use std::convert::Infallible;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};

use super::StatusDoc;
use crate::http::Limits;
use crate::mesh::{Live, LiveStatus};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("another clawnode is already serving {0}")]
    InUse(PathBuf),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Bind the API socket: 0600, or 0660 owned by `group` when one is given. A stale socket left by
/// a crash is replaced; a live one means another daemon runs, and that is an error. A group that
/// cannot be applied (unknown, or one this process may not give files to: without CAP_CHOWN a
/// file can only go to a group the process is in) is a warning and the socket stays 0600: the
/// daemon must not crash-loop over who else may read its status.
pub async fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, ApiError> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| io_err("create directory", dir, source))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
        }
        fs::remove_file(path).map_err(|source| io_err("remove stale socket", path, source))?;
    }
    let listener = UnixListener::bind(path).map_err(|source| io_err("bind", path, source))?;
    let mode = match group.map(|name| (name, give_to_group(path, name))) {
        None => 0o600,
        Some((_, Ok(()))) => 0o660,
        Some((name, Err(reason))) => {
            tracing::warn!(component = "api", socket = %path.display(), group = name, "[api] socket_group not applied, the socket stays 0600 (root and this user only): {reason}");
            0o600
        }
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|source| io_err("chmod", path, source))?;
    Ok(listener)
}

/// Give `path` to group `name`, or say why not and what would fix it. The socket is created in
/// this process's group, so the unit's own group needs no chown at all: the unit's system call
/// filter (`~@privileged`) refuses chown to everyone, CAP_CHOWN or not.
fn give_to_group(path: &Path, name: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let Some(group) = nix::unistd::Group::from_name(name).ok().flatten() else {
        return Err(format!("group {name:?} does not exist"));
    };
    let gid = group.gid.as_raw();
    if fs::metadata(path).is_ok_and(|m| m.gid() == gid) {
        return Ok(());
    }
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(|error| {
        if error.raw_os_error() == Some(libc::EPERM) {
            format!(
                "chgrp {name}: {error}; this process runs in group {} and may not give files to another group (no CAP_CHOWN, and the unit's system call filter refuses chown): use the unit's group, socket_group = \"clawbernetes\", or make {name} the unit's group with a drop-in setting Group={name}",
                nix::unistd::getegid()
            )
        } else {
            format!("chgrp {name}: {error}")
        }
    })
}

/// At most this many `/metrics` scrapes run at once, over the socket and `metrics_listen`
/// together: each reads the WireGuard device and renders every GPU series. More get a 503.
pub const MAX_CONCURRENT_SCRAPES: usize = 2;

/// What the API serves from: the supervisor's document, and what is read at request time.
#[derive(Clone)]
pub struct Sources {
    status: watch::Receiver<StatusDoc>,
    live: Live,
    gpus: crate::gpu::Shared,
    scrapes: Arc<Semaphore>,
    gateway_role: Option<Arc<crate::gateway::View>>,
}

impl Sources {
    pub fn new(status: watch::Receiver<StatusDoc>, live: Live, gpus: crate::gpu::Shared) -> Self {
        Self {
            status,
            live,
            gpus,
            scrapes: Arc::new(Semaphore::new(MAX_CONCURRENT_SCRAPES)),
            gateway_role: None,
        }
    }

    /// Also show the counters of the gateway role this daemon runs.
    pub fn with_gateway_role(mut self, view: Arc<crate::gateway::View>) -> Self {
        self.gateway_role = Some(view);
        self
    }
}

/// Serve the status API until the task is dropped.
pub async fn serve(listener: UnixListener, sources: Sources) {
    let limits = Limits::LOCAL;
    crate::http::accept_loop("api", listener, limits, move |stream, _, slot| {
        let sources = sources.clone();
        async move {
            if slot.head_in("api", &stream, limits).await {
                // Boxed, so a connection that is still waiting carries none of hyper's state.
                Box::pin(connection(stream, sources, false, limits)).await;
            }
        }
    })
    .await;
}

/// Serve only `/metrics` on a TCP listener (`[api] metrics_listen`).
pub async fn serve_metrics(listener: TcpListener, sources: Sources) {
    let limits = Limits::PEERS;
    crate::http::accept_loop("api", listener, limits, move |stream, _, slot| {
        let sources = sources.clone();
        async move {
            if slot.head_in("api", &stream, limits).await {
                // Boxed, so a connection that is still waiting carries none of hyper's state.
                Box::pin(connection(stream, sources, true, limits)).await;
            }
        }
    })
    .await;
}

/// Answer one request on an accepted connection within `limits`: any endpoint, or only
/// `/metrics` (`metrics_only`, for `metrics_listen`).
pub async fn connection<S>(io: S, sources: Sources, metrics_only: bool, limits: Limits)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let sources = sources.clone();
        async move {
            let path = req.uri().path().to_string();
            let mut doc = sources.status.borrow().clone();
            doc.gateway_role = sources.gateway_role.as_ref().map(|view| view.role_doc());
            let response = match path.as_str() {
                "/metrics" if req.method() == Method::GET || req.method() == Method::HEAD => {
                    match sources.scrapes.try_acquire() {
                        Ok(_scraping) => {
                            let live = sources.live.read().await;
                            metrics(&doc, live.as_ref(), &sources.gpus)
                        }
                        Err(_) => {
                            let mut busy = json_error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "too many concurrent scrapes; retry shortly",
                            );
                            busy.headers_mut()
                                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                            busy
                        }
                    }
                }
                _ if metrics_only => {
                    json_error(StatusCode::NOT_FOUND, "only /metrics is served here")
                }
                "/v1/status" => {
                    doc.mesh.live = sources.live.read().await;
                    let snapshot = sources.gpus.read().unwrap_or_else(|p| p.into_inner());
                    doc.gpu.xid_errors = snapshot
                        .xids
                        .counts
                        .iter()
                        .map(|(&(gpu, xid), c)| super::status::XidDoc {
                            gpu,
                            xid,
                            count: c.count,
                            last_seen_unix_ms: c.last_seen_unix_ms,
                        })
                        .collect();
                    drop(snapshot);
                    route(&req, &doc)
                }
                _ => route(&req, &doc),
            };
            Ok::<_, Infallible>(response)
        }
    });
    crate::http::serve_one("api", io, service, limits).await;
}

fn metrics(
    doc: &StatusDoc,
    live: Option<&LiveStatus>,
    gpus: &crate::gpu::Shared,
) -> Response<Full<Bytes>> {
    let snapshot = gpus.read().unwrap_or_else(|p| p.into_inner()).clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let peers = live.map(LiveStatus::tunnel_peers).unwrap_or_default();
    let gateway = live.and_then(LiveStatus::gateway);
    let paths = live.and_then(LiveStatus::tailscale_paths);
    match super::metrics::render(doc, peers, gateway, paths, &snapshot, &doc.node, now) {
        Ok(body) => respond(
            StatusCode::OK,
            super::metrics::CONTENT_TYPE,
            body.into_bytes(),
        ),
        Err(error) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

fn route(req: &Request<Incoming>, status: &StatusDoc) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
    }
    match req.uri().path() {
        "/v1/status" => match serde_json::to_vec_pretty(status) {
            Ok(body) => respond(StatusCode::OK, "application/json", body),
            Err(error) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
        },
        "/v1/health/live" if status.phase == "stopping" => {
            text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into())
        }
        "/v1/health/live" => text(StatusCode::OK, "live\n".into()),
        "/v1/health/ready" if status.ready => text(StatusCode::OK, "ready\n".into()),
        "/v1/health/ready" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", status.status),
        ),
        _ => json_error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(code, "text/plain; charset=utf-8", body.into_bytes())
}

fn json_error(code: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    respond(code, "application/json", body.into_bytes())
}

fn respond(code: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn io_err(action: &'static str, path: &Path, source: io::Error) -> ApiError {
    ApiError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::mesh::{BoxFuture, LiveSource, LiveStatus};

    /// A live view that answers only once released, so scrapes pile up behind it.
    struct Held(Arc<Semaphore>);

    impl LiveSource for Held {
        fn read(&self) -> BoxFuture<'_, Option<LiveStatus>> {
            Box::pin(async move {
                let _released = self.0.acquire().await;
                None
            })
        }
    }

    async fn scrape(addr: std::net::SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn scrapes_beyond_the_limit_are_turned_away_instead_of_piling_up() {
        let release = Arc::new(Semaphore::new(0));
        let live = Live::default();
        live.set(Some(Arc::new(Held(Arc::clone(&release)))));
        let (_status_tx, status) = watch::channel(StatusDoc::default());
        let sources = Sources::new(status, live, crate::gpu::Shared::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_metrics(listener, sources.clone()));
        let held: Vec<_> = (0..MAX_CONCURRENT_SCRAPES)
            .map(|_| tokio::spawn(scrape(addr)))
            .collect();
        while sources.scrapes.available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let turned_away = tokio::time::timeout(Duration::from_secs(10), scrape(addr))
            .await
            .expect("the scrape over the limit is answered, not queued");
        assert!(turned_away.starts_with("HTTP/1.1 503"), "{turned_away}");
        assert!(
            turned_away.to_ascii_lowercase().contains("retry-after: 1"),
            "{turned_away}"
        );
        release.add_permits(1);
        for scrape in held {
            let reply = scrape.await.unwrap();
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        }
        server.abort();
    }
}
