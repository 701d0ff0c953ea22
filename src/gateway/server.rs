//! The HTTPS endpoint: TLS, connection caps, and the handlers. Peers, services and status are
//! served from the view; only joins, adverts and re-signing write to the store.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::request::{self, MAX_BODY, Parts, Refusal, Request};
use super::store::{AdvertError, JoinTxn, Store, TokenClaim};
use super::view::{Encoded, View};
use super::{Signer, unix_now};
use crate::core::coord::{
    Advert, ErrorBody, JoinRequest, JoinResponse, NodeId, RecordFields, Role, Secret32, Session,
    b64, token_hash,
};

/// Connections over `max_sessions` are still taken through TLS to be told 503 (with a
/// Retry-After) up to this many more; past that they are closed at accept.
pub const OVERFLOW: usize = 1024;
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head (including the next one on a kept-alive connection) must come within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// A request body must arrive within this of its head: a stalled one would hold a connection
/// slot until `CONN_LIFETIME`.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed gracefully after this long, so none is held for ever.
const CONN_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// Everything the handlers share.
pub struct Gateway<S: Store> {
    pub store: Arc<S>,
    pub view: Arc<View>,
    pub signer: Arc<Signer>,
    pub pool: IpNet,
    pub mesh_cidr: IpNet,
    /// Never handed to a joining node: the gateways' own addresses.
    pub reserved: Vec<IpAddr>,
    pub gateways: Vec<String>,
    pub record_lifetime: u64,
    pub max_sessions: usize,
}

/// Serve HTTPS on `listener` until the task is dropped.
pub async fn serve<S: Store>(
    gateway: Arc<Gateway<S>>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let hard_cap = gateway.max_sessions.saturating_add(OVERFLOW);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(component = "gateway", %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let counters = &gateway.view.counters;
        let open = counters.connections.fetch_add(1, Ordering::AcqRel) as usize;
        let guard = ConnGuard(Arc::clone(&gateway.view));
        if open >= hard_cap {
            counters.refused_busy.fetch_add(1, Ordering::Relaxed);
            drop(tcp);
            drop(guard);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let busy = open >= gateway.max_sessions;
        let acceptor = acceptor.clone();
        let gateway = Arc::clone(&gateway);
        tokio::spawn(async move {
            let _guard = guard;
            let Ok(Ok(tls)) = tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)).await else {
                return;
            };
            if busy {
                gateway
                    .view
                    .counters
                    .refused_busy
                    .fetch_add(1, Ordering::Relaxed);
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(busy_response())
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(TLS_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tls), service);
                let _ = tokio::time::timeout(TLS_TIMEOUT, conn).await;
                return;
            }
            let service = hyper::service::service_fn(move |req| {
                let gateway = Arc::clone(&gateway);
                async move { Ok::<_, Infallible>(handle(&gateway, peer, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(true)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tls), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = tokio::time::sleep(CONN_LIFETIME) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(request::MAX_WAIT + TLS_TIMEOUT, conn).await;
                }
            }
        });
    }
}

/// Counts a connection until it ends.
struct ConnGuard(Arc<View>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.counters.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// 503 with a Retry-After of 1-5 s, jittered so refused nodes do not come back together.
pub fn busy_response() -> Response<Full<Bytes>> {
    let mut response = error_response(503, "gateway busy, retry later", true);
    let secs = fastrand::u64(1..=5);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// 503 for a write the store refused for now (etcd without quorum): its message, and a
/// jittered Retry-After of 2-5 s. Reads go on from the view meanwhile.
pub fn store_unavailable(view: &View, error: &str) -> Response<Full<Bytes>> {
    view.store_refused(error);
    let mut response = error_response(503, error, true);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(fastrand::u64(2..=5)));
    response
}

fn error_response(status: u16, error: &str, retry: bool) -> Response<Full<Bytes>> {
    error_body_response(status, error, retry, None)
}

fn error_body_response(
    status: u16,
    error: &str,
    retry: bool,
    last_seq: Option<u64>,
) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&ErrorBody {
        error: error.to_owned(),
        retry,
        last_seq,
    })
    .unwrap_or_default();
    json_response(status, Bytes::from(body))
}

fn json_response(status: u16, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn refusal_response(refusal: &Refusal) -> Response<Full<Bytes>> {
    error_response(refusal.status, &refusal.error, refusal.retry)
}

async fn handle<S: Store>(
    gateway: &Gateway<S>,
    peer: SocketAddr,
    req: HttpRequest<Incoming>,
) -> Response<Full<Bytes>> {
    let (head, body) = req.into_parts();
    let body =
        match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(_)) => return error_response(413, "request body over 64 KiB", false),
            Err(_) => {
                let mut response = error_response(
                    408,
                    &format!(
                        "request body not received within {} s",
                        BODY_TIMEOUT.as_secs()
                    ),
                    true,
                );
                // The rest of the body may still come: close rather than read it as the next head.
                response
                    .headers_mut()
                    .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
                return response;
            }
        };
    let target = head
        .uri
        .path_and_query()
        .map_or_else(|| head.uri.path(), |pq| pq.as_str());
    let parsed = request::parse(Parts {
        method: head.method.as_str(),
        target,
        authorization: head
            .headers
            .get(hyper::header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
        accept_encoding: head
            .headers
            .get(hyper::header::ACCEPT_ENCODING)
            .map(HeaderValue::as_bytes),
        body: &body,
        source: peer.ip(),
    });
    let request = match parsed {
        Ok(request) => request,
        Err(refusal) => return refusal_response(&refusal),
    };
    match request {
        Request::Join(join) => handle_join(gateway, peer, join).await,
        Request::Peers {
            session,
            cursor,
            wait,
            gzip,
        } => {
            if let Err(refusal) = authorised(gateway, &session).await {
                return refusal_response(&refusal);
            }
            if let Some(encoded) = wait_for_answer(&gateway.view, cursor, wait).await {
                return send_update(&gateway.view, &encoded, gzip);
            }
            // The cursor is still ahead of this view after the whole wait. If the store has
            // that revision, this gateway is behind (its feed stalled): a snapshot would roll
            // the node back, so send it to another gateway. Otherwise the store went back (a
            // restored backup): only a snapshot brings the node in step.
            match gateway.store.revision_now().await {
                Ok(now) if cursor.is_some_and(|c| c.rev <= now) => error_response(
                    503,
                    "this gateway is behind its store: try another gateway",
                    true,
                ),
                Ok(_) => send_update(&gateway.view, &gateway.view.snapshot(), gzip),
                Err(e) => error_response(503, &e.to_string(), true),
            }
        }
        Request::PutSelf { session, advert } => {
            if let Err(refusal) = authorised(gateway, &session).await {
                return refusal_response(&refusal);
            }
            match gateway.store.put_advert(advert).await {
                Ok(_) => {
                    gateway.view.store_wrote();
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    response
                }
                Err(e @ AdvertError::Stale { last, .. }) => {
                    error_body_response(409, &e.to_string(), false, Some(last))
                }
                Err(e @ AdvertError::UnknownNode) => error_response(403, &e.to_string(), false),
                Err(AdvertError::Store(e)) => {
                    tracing::warn!(component = "gateway", error = %e, "advert not stored");
                    if e.transient {
                        store_unavailable(&gateway.view, &e.to_string())
                    } else {
                        error_response(503, &e.to_string(), true)
                    }
                }
            }
        }
        Request::Services { session, name } => {
            if let Err(refusal) = authorised(gateway, &session).await {
                return refusal_response(&refusal);
            }
            let answer = gateway.view.services(&name);
            json_response(
                200,
                Bytes::from(serde_json::to_vec(&answer).unwrap_or_default()),
            )
        }
        Request::Status { session } => {
            if let Err(refusal) = authorised(gateway, &session).await {
                return refusal_response(&refusal);
            }
            json_response(200, Bytes::from(status_json(&gateway.view)))
        }
    }
}

async fn authorised<S: Store>(gateway: &Gateway<S>, session: &Session) -> Result<(), Refusal> {
    let hash = session.secret.hash();
    if gateway.view.session_valid(session.node_id, &hash) {
        return Ok(());
    }
    // The view learns other gateways' joins from the feed a moment later, and a node that
    // joined again elsewhere has a new session: the store is the authority.
    if let Ok(Some(stored)) = gateway.store.session(session.node_id).await
        && constant_time_eq(&stored, &hash)
        && gateway.view.add_stored_session(session.node_id, stored)
    {
        return Ok(());
    }
    Err(Refusal {
        status: 401,
        error: "unknown or revoked session: join again with a new token".to_owned(),
        retry: false,
    })
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a session with `cursor` is owed, waiting up to `wait` for a change when it is current;
/// a cursor still ahead of the view at the end gets a snapshot (see [`wait_for_answer`]).
#[cfg(test)]
pub async fn poll(
    view: &View,
    cursor: Option<crate::core::coord::Cursor>,
    wait: Duration,
) -> Arc<Encoded> {
    match wait_for_answer(view, cursor, wait).await {
        Some(answer) => answer,
        None => view.snapshot(),
    }
}

/// As [`poll`], but `None` when the cursor is still ahead of the view after the whole wait:
/// the caller decides between a lagging view and a store that went back.
pub async fn wait_for_answer(
    view: &View,
    cursor: Option<crate::core::coord::Cursor>,
    wait: Duration,
) -> Option<Arc<Encoded>> {
    let mut head = view.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        head.borrow_and_update();
        if let Some(answer) = view.answer(cursor) {
            return Some(answer);
        }
        if tokio::time::timeout_at(deadline, head.changed())
            .await
            .is_err()
        {
            if let Some(c) = cursor
                && c.store_id == view.store_id()
                && c.rev > view.head()
            {
                return None;
            }
            // Current all along: an empty delta with the same cursor.
            view.counters.empty_polls.fetch_add(1, Ordering::Relaxed);
            return Some(view.empty(cursor.map_or(0, |c| c.rev)));
        }
    }
}

fn send_update(view: &View, encoded: &Encoded, gzip: bool) -> Response<Full<Bytes>> {
    let counters = &view.counters;
    match encoded.kind {
        crate::core::coord::UpdateKind::Snapshot => &counters.snapshots_sent,
        crate::core::coord::UpdateKind::Delta => &counters.deltas_sent,
    }
    .fetch_add(1, Ordering::Relaxed);
    let compressed = if gzip { encoded.gzip().cloned() } else { None };
    let zipped = compressed.is_some();
    let body = compressed.unwrap_or_else(|| encoded.json.clone());
    counters
        .bytes_sent
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let mut response = json_response(200, body);
    if zipped {
        response.headers_mut().insert(
            hyper::header::CONTENT_ENCODING,
            HeaderValue::from_static("gzip"),
        );
    }
    response
}

/// Where a node may be reached, as the gateway sees it. An endpoint with an unspecified address
/// (`0.0.0.0:51820`) means "the address you see me from, this port". When the node's own
/// addresses do not include the TCP source address (it is behind NAT), that address is added
/// last, with the port of its first endpoint (NATs that keep the port make it reachable).
/// Otherwise the node's own order, its preference, is kept.
pub fn fill_source(endpoints: &mut Vec<SocketAddr>, source: IpAddr) {
    let source = match source {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    for endpoint in endpoints.iter_mut() {
        if endpoint.ip().is_unspecified() {
            endpoint.set_ip(source);
        }
    }
    let seen = endpoints.iter().any(|e| e.ip() == source);
    if let Some(first) = endpoints.first()
        && !seen
        && !source.is_loopback()
        && endpoints.len() < crate::core::coord::record::MAX_ENDPOINTS
    {
        endpoints.push(SocketAddr::new(source, first.port()));
    }
    // The node's order is its preference: keep it, dropping repeats (a filled-in wildcard
    // may repeat an address it also listed).
    let mut kept = std::collections::HashSet::new();
    endpoints.retain(|e| kept.insert(*e));
}

pub fn status_json(view: &View) -> Vec<u8> {
    serde_json::to_vec(&view.role_doc()).unwrap_or_default()
}

async fn handle_join<S: Store>(
    gateway: &Gateway<S>,
    peer: SocketAddr,
    join: JoinRequest,
) -> Response<Full<Bytes>> {
    // Known unwritable (etcd without quorum, probed every few seconds): refuse now rather
    // than queue every join behind a write that will time out.
    if !gateway.view.signer_valid(gateway.signer.key_id, unix_now()) {
        // Another gateway can still admit the node: retrying there helps.
        return error_response(
            503,
            "this gateway's signer is revoked or expired: it cannot admit nodes (try another gateway)",
            true,
        );
    }
    let health = gateway.view.store_health();
    if !health.writable {
        let reason = health
            .reason
            .unwrap_or_else(|| "the gateway store refuses writes".to_owned());
        return store_unavailable(&gateway.view, &reason);
    }
    let now = unix_now();
    let mut endpoints = join.endpoints.clone();
    fill_source(&mut endpoints, peer.ip());
    let session = Session {
        node_id: NodeId(0),
        secret: Secret32(super::random_32()),
    };
    let session_hash = session.secret.hash();
    let txn = JoinTxn {
        token: Some(TokenClaim {
            id: join.token_id.to_string(),
            hash: token_hash(&join.token_secret),
        }),
        now,
        name: join.name.clone(),
        wg_key: b64::wg_key_to_string(&join.wg_key),
        requested_address: join.requested_address,
        session_hash,
        pool: gateway.pool,
        reserved: gateway.reserved.clone(),
        sign: gateway.sign_fn(join.name.clone(), join.wg_key, vec![Role::Node], None, now),
    };
    let joined = match gateway.store.join(txn).await {
        Ok(joined) => joined,
        Err(error) => {
            let retry = error.retry();
            tracing::info!(component = "gateway", name = %join.name, %peer, %error, "join refused");
            if let super::store::JoinError::Store(e) = &error
                && e.transient
            {
                return store_unavailable(&gateway.view, &e.to_string());
            }
            let status = if retry {
                503
            } else {
                match error {
                    super::store::JoinError::UnknownToken
                    | super::store::JoinError::TokenUsed
                    | super::store::JoinError::TokenExpired => 403,
                    super::store::JoinError::PoolExhausted(_)
                    | super::store::JoinError::NameTaken(_)
                    | super::store::JoinError::NameInUse { .. }
                    | super::store::JoinError::AddressTaken(_)
                    | super::store::JoinError::AddressUnusable { .. }
                    | super::store::JoinError::KeyRevoked(_)
                    | super::store::JoinError::KeyInUse(_)
                    | super::store::JoinError::Sign(_)
                    | super::store::JoinError::Store(_) => 409,
                }
            };
            return error_response(status, &error.to_string(), retry);
        }
    };
    let node_id = joined.record.node_id;
    gateway.view.store_wrote();
    gateway.view.add_session(node_id, session_hash);
    gateway.view.counters.joins.fetch_add(1, Ordering::Relaxed);
    if !endpoints.is_empty() {
        // Seq 1: the node's own adverts (PUT /v1/self) carry higher ones.
        let advert = Advert {
            node_id,
            seq: 1,
            endpoints,
            services: Vec::new(),
            gpus: None,
        };
        if let Err(error) = gateway.store.put_advert(advert).await {
            tracing::debug!(component = "gateway", %node_id, %error, "join endpoints not stored");
        }
    }
    tracing::info!(component = "gateway", %node_id, name = %join.name, address = ?joined.record.addresses, %peer, "node joined");
    let response = JoinResponse {
        node_id,
        session: Session {
            node_id,
            secret: session.secret,
        },
        record: joined.record,
        mesh_cidr: gateway.mesh_cidr,
        gateways: gateway.view.gateways(),
    };
    json_response(
        200,
        Bytes::from(serde_json::to_vec(&response).unwrap_or_default()),
    )
}

impl<S: Store> Gateway<S> {
    /// Signs a new node's record inside the join transaction, once its id and address are known.
    /// `gateway_url` goes only into records with role gateway (this gateway's own): nodes
    /// learn the gateways from the signed peer set.
    pub fn sign_fn(
        &self,
        name: String,
        wg_key: crate::core::peer_diff::PeerKey,
        roles: Vec<Role>,
        gateway_url: Option<String>,
        now: u64,
    ) -> super::store::SignFn {
        let signer = Arc::clone(&self.signer);
        let not_after = now + self.record_lifetime;
        let gateway_url = gateway_url.filter(|_| roles.contains(&Role::Gateway));
        // Clones inside, so a store that retries its transaction can sign again.
        Box::new(move |node_id, address, serial| {
            crate::core::coord::sign_record(
                RecordFields {
                    node_id,
                    name: name.clone(),
                    wg_key,
                    addresses: vec![address],
                    roles: roles.clone(),
                    serial,
                    not_after,
                    gateway_url: gateway_url.clone(),
                },
                &signer.pkcs8,
            )
            .map_err(|e| e.to_string())
        })
    }

    /// Re-sign every record that is due (less than half its lifetime left): same key,
    /// addresses and gateway URL, next serial, a fresh expiry. Returns how many.
    pub async fn resign_due(&self, now: u64) -> usize {
        if !self.view.signer_valid(self.signer.key_id, now) {
            tracing::warn!(component = "gateway", signer = %self.signer.key_id, "this gateway's signer is revoked or expired: not re-signing");
            return 0;
        }
        let mut done = 0;
        for record in self.view.records() {
            // Also due: a record whose signer was revoked (another gateway is still running
            // with it, or joined a node just before the revocation).
            if record.not_after.saturating_sub(now) >= self.record_lifetime / 2
                && self.view.signer_valid(record.signer, now)
            {
                continue;
            }
            let mut fields = record.fields();
            fields.serial += 1;
            fields.not_after = now + self.record_lifetime;
            let signed = match crate::core::coord::sign_record(fields, &self.signer.pkcs8) {
                Ok(signed) => signed,
                Err(error) => {
                    tracing::warn!(component = "gateway", node_id = %record.node_id, %error, "cannot re-sign");
                    continue;
                }
            };
            match self.store.put_record(signed).await {
                Ok(_) => done += 1,
                Err(error) => {
                    tracing::warn!(component = "gateway", node_id = %record.node_id, %error, "re-signed record not stored");
                }
            }
        }
        done
    }
}
