//! Benchmark: one gateway (the real binary with `[gateway] enabled`, in its own network
//! namespace, HTTPS on that namespace's loopback) against 1,000 and then 10,000 simulated nodes
//! in this process, each a long-poll client over loopback TLS (`GET /v1/peers?cursor&wait`,
//! as a real node polls). Prints every figure beside its target; asserts only correctness (no
//! address given twice), never timing.
//! Run as root: `cargo test --release --features test-fakes --test bench_gateway -- --ignored --nocapture --test-threads=1`
//! `three_gateways_on_etcd_…` (needs etcd-server too): three gateways (one network namespace
//! each) on a three-member etcd in the lab's switch namespace, where the simulated nodes run:
//! 1,000 nodes spread over them, a change's spread, one gateway killed (time for its nodes to
//! resume elsewhere, snapshots sent), 10,000 racing joins over the three, RSS per node.
//! `CLAWNODE_BENCH_NODES=small,large` sizes both tests.
//!
//! Bytes are measured through a counting TCP relay in front of the gateway: what crossed the
//! socket, TLS records and handshake included. Memory is the gateway process's RSS (VmRSS, and
//! VmHWM for the peak) from /proc. The simulated nodes share the machine's cores with the
//! gateway, so every latency here includes their own TLS and JSON work.

// Test code: a failed unwrap is a failed test, and benchmarks print their figures.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]
#![cfg(feature = "test-fakes")]

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use support::Node;
use support::gateway::{self, cli_ok, create_token, percentile};
use support::lab::{self, Lab};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const PORT: u16 = 8443;
/// The mesh for 10,000+ nodes: the benchmarking range (RFC 2544), a /15.
const MESH: &str = "198.18.0.0/15";
const GATEWAY_IP: &str = "198.18.0.1";
const SMALL: usize = 1_000;
const LARGE: usize = 10_000;

/// `CLAWNODE_BENCH_NODES=small,large` runs the same phases with fewer nodes (a quick check of
/// the benchmark itself in a debug build); the targets are for 1,000 and 10,000.
fn sizes() -> (usize, usize) {
    std::env::var("CLAWNODE_BENCH_NODES")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once(',')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((SMALL, LARGE))
}
/// The long-poll's `wait`, as a real node asks.
const WAIT_S: u32 = 25;

type Https = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn gateway_config(lab: &Lab, dir: &Path) -> String {
    gateway::host_config(
        lab,
        0,
        dir,
        MESH,
        &format!(
            "address = \"{GATEWAY_IP}/15\"\n\n[gateway]\nenabled = true\n\
             listen = \"127.0.0.1:{PORT}\"\npublic_url = \"https://127.0.0.1:{PORT}\""
        ),
    )
}

/// The gateway's steady RSS with `nodes` long-polling, and what each node adds.
fn rss_figure(figures: &mut Figures, nodes: usize, steady_kb: u64, idle_kb: u64, target: &str) {
    figures.add(
        format!("gateway RSS with {nodes} long-polling nodes"),
        format!(
            "{} ({:.1} KiB per node over idle {})",
            mib(steady_kb),
            steady_kb.saturating_sub(idle_kb) as f64 / nodes as f64,
            mib(idle_kb)
        ),
        target,
    );
}

/// How long `adverts` changes took to reach all `nodes`: (p50, p99, max, missed).
fn propagation_figure(
    figures: &mut Figures,
    nodes: usize,
    adverts: usize,
    (p50, p99, max, missed): (Duration, Duration, Duration, usize),
    target: &str,
) {
    figures.add(
        format!("change applied by all {nodes} ({adverts} adverts)"),
        format!(
            "p50 {} p99 {} max {} ({missed} missed)",
            ms(p50),
            ms(p99),
            ms(max)
        ),
        target,
    );
}

/// A gateway daemon, fresh state, started and READY.
fn start_gateway(lab: &Lab) -> Node {
    let mut node = Node::prepare(|d| gateway_config(lab, d));
    cli_ok(&node, &["gateway", "init"]);
    node.launch_in(Some(lab.ns(0)), &[]);
    node.recv_until("READY=1", Duration::from_secs(60));
    node
}

fn proc_kb(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The process's user + system CPU time so far, in seconds (clock ticks of 10 ms).
fn cpu_s(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Raise this process's descriptor limit (children inherit it): 10,000 connections here, as
/// many in the gateway. Root may raise the hard limit too.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let raised = libc::rlimit {
            rlim_cur: want.max(lim.rlim_cur),
            rlim_max: want.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

// ---- the simulated node's side of the protocol (JSON as the spec fixes it) ----

fn https(ca: &Path) -> Https {
    https_with(tls_config(ca))
}

/// A client on `tls`: clients that share it share its TLS session cache, as one node's
/// successive connections do.
fn https_with(tls: Arc<rustls::ClientConfig>) -> Https {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

fn tls_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    Arc::new(gateway::tls_trusting(ca))
}

#[derive(Debug)]
enum Failed {
    /// 503: come back after this long.
    Busy(Duration),
    Other(String),
}

struct Joined {
    node_id: String,
    name: String,
    session: String,
    address: String,
}

/// The bench's token: `cbn1.<id>.<secret>.<root>.<urls>`; the join sends the id and secret.
fn token_parts(token: &str) -> (String, String) {
    let parts: Vec<&str> = token.split('.').collect();
    (parts[1].to_string(), parts[2].to_string())
}

async fn send(
    http: &Https,
    base: &str,
    method: Method,
    path: &str,
    session: Option<&str>,
    body: Option<String>,
) -> Result<(StatusCode, hyper::HeaderMap, Bytes), Failed> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("accept-encoding", "gzip");
    if let Some(s) = session {
        req = req.header("authorization", format!("Bearer {s}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = http
        .request(req)
        .await
        .map_err(|e| Failed::Other(format!("{e:?}")))?;
    let (parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| Failed::Other(e.to_string()))?
        .to_bytes();
    if parts.status == StatusCode::SERVICE_UNAVAILABLE {
        let after = parts
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(1);
        return Err(Failed::Busy(Duration::from_secs(after)));
    }
    Ok((parts.status, parts.headers, bytes))
}

async fn join(http: &Https, base: &str, token: &str, name: &str) -> Result<Joined, Failed> {
    let (id, secret) = token_parts(token);
    let wg = wireguard_control::Key::generate_private()
        .get_public()
        .to_base64();
    let body = serde_json::json!({
        "token_id": id, "token_secret": secret, "name": name, "wg_key": wg,
        "endpoints": [], "requested_address": null,
    });
    let (status, _, bytes) = send(
        http,
        base,
        Method::POST,
        "/v1/join",
        None,
        Some(body.to_string()),
    )
    .await?;
    if status != StatusCode::OK {
        return Err(Failed::Other(format!(
            "join {status}: {}",
            String::from_utf8_lossy(&bytes)
        )));
    }
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    Ok(Joined {
        node_id: json_text(&doc["node_id"]),
        name: name.to_string(),
        session: json_text(&doc["session"]),
        address: json_text(&doc["record"]["addresses"][0]),
    })
}

/// A string as it is, anything else (a cursor as an object, a number) as its JSON text.
fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) if o.contains_key("store_id") => {
            format!("{}.{}", json_text(&o["store_id"]), json_text(&o["rev"]))
        }
        other @ (serde_json::Value::Null
        | serde_json::Value::Bool(_)
        | serde_json::Value::Number(_)
        | serde_json::Value::Array(_)
        | serde_json::Value::Object(_)) => other.to_string(),
    }
}

/// What a simulated node reads of an update: enough to follow it and to spot the change the
/// bench is timing; everything else is skipped.
#[derive(Deserialize)]
struct Head {
    cursor: serde_json::Value,
    kind: String,
    #[serde(default)]
    records: Vec<Named>,
    #[serde(default)]
    revocations: Vec<Named>,
    #[serde(default)]
    adverts: Vec<Sequenced>,
}

#[derive(Deserialize)]
struct Named {
    node_id: serde_json::Value,
}

#[derive(Deserialize)]
struct Sequenced {
    node_id: serde_json::Value,
    seq: u64,
}

fn decode(headers: &hyper::HeaderMap, body: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let gz = headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    if !gz {
        return body.to_vec();
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// One `GET /v1/peers`: the update as read, and its body's size (as sent, then decoded).
async fn poll(
    http: &Https,
    base: &str,
    session: &str,
    cursor: Option<&str>,
    wait: u32,
) -> Result<(Head, usize, usize), Failed> {
    let path = match cursor {
        Some(c) => format!("/v1/peers?cursor={c}&wait={wait}"),
        None => format!("/v1/peers?wait={wait}"),
    };
    let (status, headers, bytes) =
        send(http, base, Method::GET, &path, Some(session), None).await?;
    if status != StatusCode::OK {
        return Err(Failed::Other(format!(
            "peers {status}: {}",
            String::from_utf8_lossy(&bytes)
        )));
    }
    let plain = decode(&headers, &bytes);
    let head: Head =
        serde_json::from_slice(&plain).map_err(|e| Failed::Other(format!("update: {e}")))?;
    Ok((head, bytes.len(), plain.len()))
}

async fn put_self(
    http: &Https,
    base: &str,
    node: &Joined,
    seq: u64,
    port: u16,
) -> Result<(), Failed> {
    let body = serde_json::json!({
        "node_id": node.node_id, "seq": seq, "endpoints": [],
        "services": [{"name": "bench", "port": port}], "gpus": null,
    });
    let (status, _, bytes) = send(
        http,
        base,
        Method::PUT,
        "/v1/self",
        Some(&node.session),
        Some(body.to_string()),
    )
    .await?;
    if !status.is_success() {
        return Err(Failed::Other(format!(
            "self {status}: {}",
            String::from_utf8_lossy(&bytes)
        )));
    }
    Ok(())
}

/// Full-jitter backoff, 250 ms doubling to a 30 s cap (the node client's policy).
fn backoff(failures: u32) -> Duration {
    let cap = Duration::from_millis(250)
        .saturating_mul(1 << failures.min(7))
        .min(Duration::from_secs(30));
    cap.mul_f64(fastrand::f64())
}

// ---- what the simulated nodes watch for ----

#[derive(Clone, PartialEq)]
enum Target {
    Advert(String, u64),
    Record(String),
    Revocation(String),
}

impl Target {
    fn in_update(&self, head: &Head) -> bool {
        match self {
            Target::Advert(id, seq) => head
                .adverts
                .iter()
                .any(|a| json_text(&a.node_id) == *id && a.seq >= *seq),
            Target::Record(id) => head.records.iter().any(|r| json_text(&r.node_id) == *id),
            Target::Revocation(id) => head
                .revocations
                .iter()
                .any(|r| json_text(&r.node_id) == *id),
        }
    }
}

/// The change being timed and when each simulated node saw it.
struct Watch {
    target: Mutex<Option<(Target, Vec<Option<Instant>>)>>,
    left: AtomicUsize,
    done: Notify,
    snapshots: AtomicUsize,
    errors: AtomicUsize,
    busy: AtomicUsize,
}

impl Watch {
    fn new() -> Arc<Watch> {
        Arc::new(Watch {
            target: Mutex::new(None),
            left: AtomicUsize::new(0),
            done: Notify::new(),
            snapshots: AtomicUsize::new(0),
            errors: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
        })
    }

    fn arm(&self, target: Target, nodes: usize) {
        self.arm_except(target, nodes, None);
    }

    /// As `arm`, with node `except` not waited for (it is the one revoked).
    fn arm_except(&self, target: Target, nodes: usize, except: Option<usize>) {
        let mut seen = vec![None; nodes];
        if let Some(i) = except {
            seen[i] = Some(Instant::now());
        }
        self.left
            .store(nodes - usize::from(except.is_some()), Ordering::SeqCst);
        *self.target.lock().unwrap() = Some((target, seen));
    }

    fn saw(&self, i: usize, head: &Head) {
        let now = Instant::now();
        let mut guard = self.target.lock().unwrap();
        let Some((target, seen)) = guard.as_mut() else {
            return;
        };
        if seen[i].is_none() && (head.kind == "snapshot" || target.in_update(head)) {
            seen[i] = Some(now);
            if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.done.notify_one();
            }
        }
    }

    /// Wait until every node saw the armed change (or `limit`); the arrival times.
    async fn wait(&self, limit: Duration) -> Vec<Option<Instant>> {
        let _ = tokio::time::timeout(limit, async {
            while self.left.load(Ordering::SeqCst) > 0 {
                self.done.notified().await;
            }
        })
        .await;
        self.target.lock().unwrap().take().unwrap().1
    }
}

/// A simulated node following the stream from `cursor` until aborted. After any failure it
/// backs off, then asks with `wait=0` once (a reconnecting node catches up at once).
async fn follow(
    http: Https,
    base: String,
    i: usize,
    session: String,
    cursor: String,
    watch: Arc<Watch>,
) {
    let mut cursor = cursor;
    let mut failures = 0u32;
    loop {
        let wait = if failures > 0 { 0 } else { WAIT_S };
        match poll(&http, &base, &session, Some(&cursor), wait).await {
            Ok((head, _, _)) => {
                failures = 0;
                if head.kind == "snapshot" {
                    watch.snapshots.fetch_add(1, Ordering::Relaxed);
                }
                watch.saw(i, &head);
                cursor = json_text(&head.cursor);
            }
            Err(e) => {
                failures += 1;
                let pause = match e {
                    Failed::Busy(after) => {
                        watch.busy.fetch_add(1, Ordering::Relaxed);
                        after.mul_f64(0.5 + fastrand::f64())
                    }
                    Failed::Other(_) => {
                        watch.errors.fetch_add(1, Ordering::Relaxed);
                        backoff(failures)
                    }
                };
                tokio::time::sleep(pause).await;
            }
        }
    }
}

// ---- a counting relay, for bytes on the wire ----

/// Bytes through the relay so far, both directions, over all its connections.
#[derive(Default)]
struct Wire {
    up: AtomicU64,
    down: AtomicU64,
}

impl Wire {
    fn total(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::SeqCst),
            self.down.load(Ordering::SeqCst),
        )
    }

    /// Bytes (up, down) that crossed while `f` ran. The caller's requests are sequential
    /// and each reads its whole answer, so nothing is counted late.
    async fn during<T>(&self, f: impl Future<Output = T>) -> (T, u64, u64) {
        let (u0, d0) = self.total();
        let out = f.await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (u1, d1) = self.total();
        (out, u1 - u0, d1 - d0)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<Wire>,
    up: bool,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let counter = if up { &count.up } else { &count.down };
        counter.fetch_add(n as u64, Ordering::SeqCst);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A TCP relay on loopback in front of the gateway that counts what crosses it: TLS records,
/// handshakes included, as on the wire.
async fn relay(upstream: SocketAddr) -> (u16, Arc<Wire>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let wire = Arc::new(Wire::default());
    let count = wire.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, count.clone(), true));
            tokio::spawn(pump(sr, cw, count.clone(), false));
        }
    });
    (port, wire)
}

// ---- phases ----

struct Figures(Vec<(String, String, String)>);

impl Figures {
    fn add(
        &mut self,
        what: impl Into<String>,
        measured: impl Into<String>,
        target: impl Into<String>,
    ) {
        let (what, measured, target) = (what.into(), measured.into(), target.into());
        println!("  {what}: {measured} (target {target})");
        self.0.push((what, measured, target));
    }
}

/// Join `count` nodes with at most `parallel` joins in flight (`count` for all at once);
/// retries on 503. Returns them and each join's latency.
async fn join_many(
    http: &Https,
    base: &str,
    token: &str,
    prefix: &str,
    count: usize,
    parallel: usize,
) -> (Vec<Joined>, Vec<Duration>, usize) {
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let retries = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let (http, base, token, gate, retries) = (
                http.clone(),
                base.to_string(),
                token.to_string(),
                gate.clone(),
                retries.clone(),
            );
            let name = format!("{prefix}{i}");
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                let start = Instant::now();
                let mut failures = 0;
                loop {
                    match join(&http, &base, &token, &name).await {
                        Ok(j) => return (j, start.elapsed()),
                        Err(Failed::Busy(after)) => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(after.mul_f64(fastrand::f64())).await;
                        }
                        Err(Failed::Other(e)) => {
                            failures += 1;
                            retries.fetch_add(1, Ordering::Relaxed);
                            assert!(failures < 20, "join {name}: {e}");
                            tokio::time::sleep(backoff(failures)).await;
                        }
                    }
                }
            })
        })
        .collect();
    let mut joined = Vec::with_capacity(count);
    let mut took = Vec::with_capacity(count);
    for t in tasks {
        let (j, d) = t.await.unwrap();
        joined.push(j);
        took.push(d);
    }
    (joined, took, retries.load(Ordering::Relaxed))
}

/// `rounds` adverts from `changer`, each timed until every follower saw it: p50, p99, max.
async fn propagation(
    http: &Https,
    base: &str,
    changer: &Joined,
    seq: &mut u64,
    watch: &Watch,
    nodes: usize,
    rounds: usize,
) -> (Duration, Duration, Duration, usize) {
    let mut samples = Vec::new();
    let mut missed = 0;
    for r in 0..rounds {
        *seq += 1;
        watch.arm(Target::Advert(changer.node_id.clone(), *seq), nodes);
        let t0 = Instant::now();
        put_self(http, base, changer, *seq, 9000 + r as u16)
            .await
            .unwrap();
        for at in watch.wait(Duration::from_secs(30)).await {
            match at {
                Some(at) => samples.push(at.saturating_duration_since(t0)),
                None => missed += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let p50 = percentile(&mut samples, 50.0);
    let p99 = percentile(&mut samples, 99.0);
    (
        p50,
        p99,
        samples.last().copied().unwrap_or_default(),
        missed,
    )
}

/// Bytes on the wire of: a snapshot, a one-peer delta (a node joins while the probe waits
/// with the current cursor) and a reconnect with the current cursor. Each is measured on a
/// connection already open, and the TLS handshake of a fresh one is given beside it.
#[allow(clippy::too_many_arguments)]
async fn bytes_figures(
    figures: &mut Figures,
    at: usize,
    ca: &Path,
    relay_base: &str,
    base: &str,
    wire: &Wire,
    probe: &Joined,
    token: &str,
) -> String {
    let client = https(ca);
    let snapshot = || poll(&client, relay_base, &probe.session, None, 0);
    let (_, cold_up, cold_down) = wire.during(snapshot()).await;
    let (answer, up, down) = wire.during(snapshot()).await;
    let (head, sent, plain) = answer.unwrap();
    assert_eq!(head.kind, "snapshot");
    let cursor = json_text(&head.cursor);
    figures.add(
        format!("snapshot of {at} peers on the wire"),
        format!(
            "{} down ({} body gzip, {} JSON), {up} B up; a fresh connection adds {} for TLS",
            kib(down),
            kib(sent as u64),
            kib(plain as u64),
            kib((cold_up + cold_down).saturating_sub(up + down))
        ),
        if at == SMALL {
            "<= 160 KiB"
        } else {
            "none; shows growth"
        },
    );

    let waiting = {
        let (client, base, session, cursor) = (
            client.clone(),
            relay_base.to_string(),
            probe.session.clone(),
            cursor.clone(),
        );
        async move { poll(&client, &base, &session, Some(&cursor), WAIT_S).await }
    };
    let newcomer_name = format!("delta-probe-{at}");
    let ((delta, newcomer), up, down) = wire
        .during(async {
            let waiting = tokio::spawn(waiting);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let newcomer = join(&https(ca), base, token, &newcomer_name).await.unwrap();
            (waiting.await.unwrap().unwrap(), newcomer)
        })
        .await;
    let (head, body, _) = delta;
    assert_eq!(head.kind, "delta");
    assert!(Target::Record(newcomer.node_id.clone()).in_update(&head));
    let cursor = json_text(&head.cursor);
    figures.add(
        format!("one-peer delta (a join) at {at} nodes"),
        format!(
            "{down} B down (body {body} B: {} record, {} advert), {up} B up",
            head.records.len(),
            head.adverts.len()
        ),
        "<= 1 KiB",
    );

    // One node's TLS state across its connections: the first is a full handshake, a
    // reconnect (a new TCP connection) resumes the session, and a poll on an open connection
    // costs only HTTP.
    let tls = tls_config(ca);
    let reconnect = |client: Https| {
        let cursor = cursor.clone();
        let session = probe.session.clone();
        async move {
            let (head, _, _) = poll(&client, relay_base, &session, Some(&cursor), 0)
                .await
                .unwrap();
            assert_eq!(head.kind, "delta", "a current cursor gets no snapshot");
            assert!(head.records.is_empty() && head.adverts.is_empty());
            client
        }
    };
    let (open, cold_up, cold_down) = wire.during(reconnect(https_with(tls.clone()))).await;
    let (_, up, down) = wire.during(reconnect(open)).await;
    let (_, resumed_up, resumed_down) = wire.during(reconnect(https_with(tls))).await;
    figures.add(
        format!("reconnect with a current cursor at {at} nodes"),
        format!(
            "{} B on a new TCP connection resuming TLS ({resumed_down} B down, {resumed_up} B up); \
             {} B on an open connection; a first-ever connection (full handshake) {} B",
            resumed_up + resumed_down,
            up + down,
            cold_up + cold_down
        ),
        "<= 1 KiB",
    );
    cursor
}

fn sorted_unique(addresses: impl Iterator<Item = String>) -> (usize, usize) {
    let all: Vec<String> = addresses.collect();
    let set: BTreeSet<&String> = all.iter().collect();
    (all.len(), set.len())
}

/// Real nodes (the release binary, userspace WireGuard, one namespace each) started together
/// with nothing but a token: exec to READY=1, and to every other node on the device.
fn token_to_ready(figures: &mut Figures) {
    const REAL: usize = 16;
    let lab = Lab::new(REAL + 1);
    let gw = gateway::start_gateway(&lab, 0);
    gw.node.recv_until("READY=1", Duration::from_secs(60));
    let tokens: Vec<String> = (0..REAL).map(|_| create_token(&gw.node, &[])).collect();
    let members: Vec<gateway::Host> = tokens
        .iter()
        .enumerate()
        .map(|(k, t)| gateway::start_member(&lab, k + 1, t))
        .collect();
    let mut keys: Vec<String> = members.iter().map(|m| m.key.clone()).collect();
    keys.push(gw.key.clone());
    let (mut ready, mut peers): (Vec<Duration>, Vec<Duration>) = std::thread::scope(|s| {
        let threads: Vec<_> = members
            .iter()
            .enumerate()
            .map(|(k, m)| {
                let (lab, keys) = (&lab, &keys);
                s.spawn(move || {
                    m.node.recv_until("READY=1", Duration::from_secs(60));
                    let ready = m.node.started.elapsed();
                    let mut want: Vec<String> =
                        keys.iter().filter(|key| **key != m.key).cloned().collect();
                    want.sort_unstable();
                    let iface = lab.iface(k + 1);
                    let all = gateway::time_until(
                        Duration::from_secs(60),
                        Duration::from_millis(5),
                        || gateway::device_peers(&iface) == want,
                    );
                    assert!(
                        all.is_some(),
                        "node {k} never had every peer\n{}",
                        m.node.stderr()
                    );
                    (ready, m.node.started.elapsed())
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).unzip()
    });
    figures.add(
        format!("token -> READY=1, {REAL} real nodes started together"),
        format!(
            "p50 {} p99 {}",
            ms(percentile(&mut ready, 50.0)),
            ms(percentile(&mut ready, 99.0))
        ),
        "p99 <= 2 s (with peers)",
    );
    figures.add(
        format!("token -> all {REAL} peers on the device"),
        format!(
            "p50 {} p99 {}",
            ms(percentile(&mut peers, 50.0)),
            ms(percentile(&mut peers, 99.0))
        ),
        "p99 <= 2 s",
    );
}

#[test]
#[ignore = "benchmark; run by tests/run-all.sh with --release"]
fn gateway_with_1000_then_10000_long_polling_nodes() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let nofile = raise_nofile(65_536);
    let mut real = Figures(Vec::new());
    token_to_ready(&mut real);
    let lab = Lab::new(1);
    let ns = lab.netns_file(lab.ns(0));
    // Every thread of the runtime is created from a thread inside the gateway's namespace, so
    // the simulated nodes reach it on that namespace's loopback.
    let figures = lab::in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(bench(&lab, nofile))
    })
    .join()
    .unwrap();
    println!("\ngateway benchmark figures:");
    for (what, measured, target) in real.0.iter().chain(&figures.0) {
        println!("  {what:<58} {measured}  [target {target}]");
    }
}

async fn bench(lab: &Lab, nofile: u64) -> Figures {
    let (small, large) = sizes();
    let mut figures = Figures(Vec::new());
    let started = Instant::now();
    let base = format!("https://127.0.0.1:{PORT}");
    let upstream: SocketAddr = format!("127.0.0.1:{PORT}").parse().unwrap();
    let (relay_port, wire) = relay(upstream).await;
    let relay_base = format!("https://127.0.0.1:{relay_port}");
    println!("descriptor limit {nofile}");

    // ---- 1,000 nodes ----
    let mut gateway = start_gateway(lab);
    let ca = gateway.path("state/gateway/ca.pem");
    let http = https(&ca);
    let pid = gateway.pid().as_raw();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kb = proc_kb(pid, "VmRSS:");
    println!("gateway idle: {}", mib(idle_kb));
    let token = create_token(&gateway, &["--uses", "100000", "--ttl", "2h"]);

    let t = Instant::now();
    let cpu0 = cpu_s(pid);
    let (nodes, took, retries) = join_many(&http, &base, &token, "sim-", small, 64).await;
    let mut took = took;
    println!(
        "{small} joins (64 at a time) in {} (the gateway used {:.1} CPU-s); join latency p50 {} p99 {}; {retries} retries",
        ms(t.elapsed()),
        cpu_s(pid) - cpu0,
        ms(percentile(&mut took, 50.0)),
        ms(percentile(&mut took, 99.0))
    );
    let changer = join(&http, &base, &token, "changer").await.unwrap();
    let probe = join(&http, &base, &token, "probe").await.unwrap();

    // Each node's first poll is a snapshot (as after a real join); then it follows.
    let watch = Watch::new();
    let t = Instant::now();
    let firsts: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (http, base, session) = (http.clone(), base.clone(), n.session.clone());
            tokio::spawn(async move { poll(&http, &base, &session, None, 0).await })
        })
        .collect();
    let mut followers = Vec::new();
    for (i, first) in firsts.into_iter().enumerate() {
        let (head, _, _) = first.await.unwrap().unwrap();
        assert_eq!(head.kind, "snapshot");
        followers.push(tokio::spawn(follow(
            http.clone(),
            base.clone(),
            i,
            nodes[i].session.clone(),
            json_text(&head.cursor),
            watch.clone(),
        )));
    }
    println!("{small} first snapshots fetched in {}", ms(t.elapsed()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steady_kb = proc_kb(pid, "VmRSS:");
    rss_figure(
        &mut figures,
        small,
        steady_kb,
        idle_kb,
        "<= 64 KiB per node, <= 128 MiB",
    );

    let mut seq = 1;
    let spread = propagation(&http, &base, &changer, &mut seq, &watch, small, 10).await;
    propagation_figure(
        &mut figures,
        small,
        10,
        spread,
        "p50 <= 100 ms, p99 <= 500 ms",
    );
    bytes_figures(
        &mut figures,
        small,
        &ca,
        &relay_base,
        &base,
        &wire,
        &probe,
        &token,
    )
    .await;

    // Sustained churn: an advert every 50 ms, a join every 250 ms, a revocation every 2 s.
    let churn_for = Duration::from_secs(20);
    let t = Instant::now();
    let mut samples = Vec::new();
    let mut joined = 0;
    let mut revoked = 0;
    let mut next_sample = Instant::now();
    let mut tick = 0u64;
    while t.elapsed() < churn_for {
        tick += 1;
        seq += 1;
        put_self(&http, &base, &changer, seq, 1000 + (tick % 1000) as u16)
            .await
            .unwrap();
        if tick.is_multiple_of(5) {
            join(&http, &base, &token, &format!("churn-{tick}"))
                .await
                .unwrap();
            joined += 1;
        }
        if tick.is_multiple_of(40) {
            cli_ok(
                &gateway,
                &["gateway", "revoke", &format!("churn-{}", tick - 35)],
            );
            revoked += 1;
        }
        if Instant::now() >= next_sample {
            samples.push(proc_kb(pid, "VmRSS:"));
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_churn = proc_kb(pid, "VmRSS:");
    figures.add(
        format!("gateway RSS over {}s of churn at {small} nodes", churn_for.as_secs()),
        format!(
            "start {} min {} max {} end {} after {} ({tick} adverts, {joined} joins, {revoked} revocations)",
            mib(steady_kb),
            mib(*samples.iter().min().unwrap()),
            mib(*samples.iter().max().unwrap()),
            mib(*samples.last().unwrap()),
            mib(after_churn)
        ),
        "flat",
    );

    // The gateway is killed; a node is revoked while it is down (in the store, by the CLI);
    // it restarts and every node must catch up (see the revocation) from its cursor.
    let before_kb = proc_kb(pid, "VmRSS:");
    gateway.kill9();
    let snapshots_before = watch.snapshots.load(Ordering::SeqCst);
    let gone = &nodes[small - 1];
    watch.arm_except(
        Target::Revocation(gone.node_id.clone()),
        small,
        Some(small - 1),
    );
    cli_ok(&gateway, &["gateway", "revoke", &gone.name]);
    let t0 = Instant::now();
    gateway.restart();
    let pid = gateway.pid().as_raw();
    let arrivals = watch.wait(Duration::from_secs(60)).await;
    let caught: Vec<Duration> = arrivals[..small - 1]
        .iter()
        .flatten()
        .map(|at| at.saturating_duration_since(t0))
        .collect();
    let peak_kb = proc_kb(pid, "VmHWM:");
    let snapshots = watch.snapshots.load(Ordering::SeqCst) - snapshots_before;
    figures.add(
        format!("all {small} reconnect to a restarted gateway and catch up"),
        format!(
            "{} of {} caught up (the revoked one aside), the last {} after the restart began ({snapshots} snapshots)",
            caught.len(),
            small - 1,
            ms(caught.iter().max().copied().unwrap_or_default())
        ),
        "<= 10 s",
    );
    figures.add(
        "gateway peak RSS during that reconnect",
        format!(
            "{} (steady before: {}, ratio {:.2})",
            mib(peak_kb),
            mib(before_kb),
            peak_kb as f64 / before_kb as f64
        ),
        "<= 2x steady",
    );
    for f in followers {
        f.abort();
    }
    println!(
        "poll errors {} (while the gateway was down), 503s {}",
        watch.errors.load(Ordering::SeqCst),
        watch.busy.load(Ordering::SeqCst)
    );
    gateway.stop(Duration::from_secs(30));
    drop(gateway);
    println!("1,000-node part took {}", ms(started.elapsed()));

    // ---- 10,000 racing joins, then 10,000 nodes ----
    let gateway = start_gateway(lab);
    let ca = gateway.path("state/gateway/ca.pem");
    let http = https(&ca);
    let pid = gateway.pid().as_raw();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kb = proc_kb(pid, "VmRSS:");
    let token = create_token(&gateway, &["--uses", "100000", "--ttl", "2h"]);
    let t = Instant::now();
    let cpu0 = cpu_s(pid);
    let (nodes, mut took, retries) = join_many(&http, &base, &token, "sim-", large, large).await;
    let join_cpu = cpu_s(pid) - cpu0;
    let mut done: Vec<Duration> = took.clone();
    done.sort_unstable();
    let quartiles: Vec<String> = [25, 50, 75, 100]
        .iter()
        .map(|q| format!("{q}% by {}", ms(done[(done.len() * q / 100).max(1) - 1])))
        .collect();
    println!(
        "{large} racing joins: {}; the gateway used {join_cpu:.1} CPU-s",
        quartiles.join(", ")
    );
    let (total, unique) = sorted_unique(nodes.iter().map(|n| n.address.clone()));
    figures.add(
        format!("{large} racing joins"),
        format!(
            "{total} joined in {}, {unique} distinct addresses; latency p50 {} p99 {}; {retries} retries",
            ms(t.elapsed()),
            ms(percentile(&mut took, 50.0)),
            ms(percentile(&mut took, 99.0))
        ),
        "no address twice",
    );
    assert_eq!(unique, total, "an address was allocated twice");
    let listed = cli_ok(&gateway, &["gateway", "nodes", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let rows = listed
        .as_array()
        .cloned()
        .or_else(|| listed["nodes"].as_array().cloned())
        .unwrap_or_default();
    let mut by_address: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        let address = json_text(&row["addresses"][0]);
        let address = if address == "null" {
            json_text(&row["address"])
        } else {
            address
        };
        *by_address.entry(address).or_default() += 1;
    }
    let twice: Vec<_> = by_address.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "the store lists an address twice: {twice:?}"
    );
    assert!(
        rows.len() > large,
        "gateway nodes lists {} nodes",
        rows.len()
    );

    let changer = join(&http, &base, &token, "changer").await.unwrap();
    let probe = join(&http, &base, &token, "probe").await.unwrap();
    let cursor = bytes_figures(
        &mut figures,
        large,
        &ca,
        &relay_base,
        &base,
        &wire,
        &probe,
        &token,
    )
    .await;
    // The 10,000 follow from the current cursor (a snapshot each would only measure this
    // process decoding 10,000 x the snapshot above).
    let watch = Watch::new();
    let followers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            tokio::spawn(follow(
                http.clone(),
                base.clone(),
                i,
                n.session.clone(),
                cursor.clone(),
                watch.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let steady_kb = proc_kb(pid, "VmRSS:");
    rss_figure(
        &mut figures,
        large,
        steady_kb,
        idle_kb,
        "none; shows growth",
    );
    let mut seq = 1;
    let spread = propagation(&http, &base, &changer, &mut seq, &watch, large, 5).await;
    propagation_figure(&mut figures, large, 5, spread, "none; shows growth");
    println!(
        "poll errors {}, 503s {}",
        watch.errors.load(Ordering::SeqCst),
        watch.busy.load(Ordering::SeqCst)
    );
    for f in followers {
        f.abort();
    }
    println!("whole benchmark took {}", ms(started.elapsed()));
    figures
}

// ---- three gateways on one etcd cluster (issue 15) ----

/// Gateway `i` of the three: its own address 198.18.0.<i + 1> in the benchmark mesh, nodes'
/// addresses from 198.19.0.0/16 (so no join takes a gateway's own address).
fn etcd_gateway_config(lab: &Lab, i: usize, dir: &Path, endpoints: &[String]) -> String {
    let own = format!("address = \"198.18.0.{}/15\"", i + 1);
    gateway::etcd_gateway_config_on(lab, i, dir, endpoints, (MESH, &own, "198.19.0.0/16"))
}

/// When each simulated node first got an answer from a gateway other than the last that
/// answered it (its resume after losing that one).
type Switched = Arc<Mutex<Vec<Option<Instant>>>>;

/// A simulated node following the stream as a real node does across several gateways: the
/// last one that answered first; after a failure the others in a shuffled order, full-jitter
/// backoff between tries, `wait=0` on the first poll after a failure, always with its cursor.
#[allow(clippy::too_many_arguments)]
async fn follow_gateways(
    http: Https,
    bases: Arc<Vec<String>>,
    home: usize,
    i: usize,
    session: String,
    cursor: String,
    watch: Arc<Watch>,
    switched: Switched,
) {
    let mut cursor = cursor;
    let mut failures = 0u32;
    let mut last_good = home;
    let mut queue = vec![home];
    loop {
        let at = queue[0];
        let wait = if failures > 0 { 0 } else { WAIT_S };
        match poll(&http, &bases[at], &session, Some(&cursor), wait).await {
            Ok((head, _, _)) => {
                if at != last_good {
                    switched.lock().unwrap()[i] = Some(Instant::now());
                    last_good = at;
                    queue = vec![at];
                }
                failures = 0;
                if head.kind == "snapshot" {
                    watch.snapshots.fetch_add(1, Ordering::Relaxed);
                }
                watch.saw(i, &head);
                cursor = json_text(&head.cursor);
            }
            Err(e) => {
                failures += 1;
                queue.remove(0);
                if queue.is_empty() {
                    // A round: the others shuffled, then the last good one again (the node
                    // client's Rotation, which began this round with the last good one).
                    let mut others: Vec<usize> =
                        (0..bases.len()).filter(|&g| g != last_good).collect();
                    fastrand::shuffle(&mut others);
                    queue = others;
                    queue.push(last_good);
                }
                let pause = match e {
                    Failed::Busy(after) => {
                        watch.busy.fetch_add(1, Ordering::Relaxed);
                        after.mul_f64(0.5 + fastrand::f64())
                    }
                    Failed::Other(_) => {
                        watch.errors.fetch_add(1, Ordering::Relaxed);
                        backoff(failures)
                    }
                };
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[test]
#[ignore = "benchmark; run by tests/run-all.sh with --release"]
fn three_gateways_on_etcd_with_1000_nodes_a_gateway_killed_and_10000_racing_joins() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    if support::etcd::EtcdCluster::missing() {
        return;
    }
    let nofile = raise_nofile(65_536);
    println!("descriptor limit {nofile}");
    // Gateways on hosts 0..3, one namespace each; etcd and the simulated nodes in the lab's
    // switch namespace, on the bridge every gateway is plugged into.
    let lab = Lab::new(3);
    let etcd = gateway::lab_etcd(&lab);
    let endpoints = etcd.endpoints();
    let gateways =
        gateway::start_etcd_gateways(&lab, 3, |i, d| etcd_gateway_config(&lab, i, d, &endpoints));
    let ns = lab.netns_file(&lab.switch);
    let lab = Arc::new(lab);
    let inside = lab.clone();
    let figures = lab::in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(bench_ha(&inside, gateways))
    })
    .join()
    .unwrap();
    drop(etcd);
    println!("\nthree gateways on etcd, benchmark figures:");
    for (what, measured, target) in &figures.0 {
        println!("  {what:<58} {measured}  [target {target}]");
    }
}

async fn bench_ha(lab: &Lab, mut gateways: Vec<gateway::Host>) -> Figures {
    let (small, large) = sizes();
    let mut figures = Figures(Vec::new());
    let started = Instant::now();
    let bases: Arc<Vec<String>> = Arc::new((0..3).map(|g| gateway::gateway_url(lab, g)).collect());
    let ca = gateways[0].node.path("state/gateway/ca.pem");
    let http = https(&ca);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids: Vec<i32> = gateways.iter().map(|g| g.node.pid().as_raw()).collect();
    let idle_kb: Vec<u64> = pids.iter().map(|&p| proc_kb(p, "VmRSS:")).collect();
    println!(
        "gateways idle: {}",
        idle_kb
            .iter()
            .map(|&k| mib(k))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let token = gateway::create_token_in(
        lab.ns(0),
        &gateways[0].node,
        &["--uses", "100000", "--ttl", "2h"],
    );

    // ---- 1,000 nodes, a third joined through each gateway, each following that one ----
    let t = Instant::now();
    let per = small / 3;
    let counts = [per, per, small - 2 * per];
    let joins = (0..3).map(|g| {
        let (http, base, token) = (&http, &bases[g], &token);
        async move { join_many(http, base, token, &format!("sim-g{g}-"), counts[g], 32).await }
    });
    let joined = futures::future::join_all(joins).await;
    let mut nodes: Vec<(usize, Joined)> = Vec::new();
    let mut retries = 0;
    for (g, (list, _, r)) in joined.into_iter().enumerate() {
        retries += r;
        nodes.extend(list.into_iter().map(|j| (g, j)));
    }
    println!(
        "{small} joins over three gateways in {} ({retries} retries)",
        ms(t.elapsed())
    );
    let changer = join(&http, &bases[0], &token, "changer").await.unwrap();

    let watch = Watch::new();
    let switched: Switched = Arc::new(Mutex::new(vec![None; small]));
    let firsts: Vec<_> = nodes
        .iter()
        .map(|(g, n)| {
            let (http, base, session) = (http.clone(), bases[*g].clone(), n.session.clone());
            tokio::spawn(async move { poll(&http, &base, &session, None, 0).await })
        })
        .collect();
    let mut followers = Vec::new();
    for (i, first) in firsts.into_iter().enumerate() {
        let (head, _, _) = first.await.unwrap().unwrap();
        assert_eq!(head.kind, "snapshot");
        followers.push(tokio::spawn(follow_gateways(
            http.clone(),
            bases.clone(),
            nodes[i].0,
            i,
            nodes[i].1.session.clone(),
            json_text(&head.cursor),
            watch.clone(),
            switched.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for g in 0..3 {
        let steady = proc_kb(pids[g], "VmRSS:");
        figures.add(
            format!(
                "gateway {g}'s RSS with its {} long-polling nodes",
                counts[g]
            ),
            format!(
                "{} ({:.1} KiB per node over idle {})",
                mib(steady),
                steady.saturating_sub(idle_kb[g]) as f64 / counts[g] as f64,
                mib(idle_kb[g])
            ),
            "<= 64 KiB per node (as issue 9)",
        );
    }

    // A change made on gateway 1 (an advert), seen by nodes on all three.
    let mut seq = 1;
    let spread = propagation(&http, &bases[0], &changer, &mut seq, &watch, small, 10).await;
    propagation_figure(&mut figures, small, 10, spread, "p99 <= 1 s");

    // ---- gateway 2 killed: its nodes resume on the other two with their cursors ----
    let snapshots_before = watch.snapshots.load(Ordering::SeqCst);
    let victims: Vec<usize> = (0..small).filter(|&i| nodes[i].0 == 1).collect();
    let t0 = Instant::now();
    gateways[1].node.kill9();
    let all_back = gateway::time_until(Duration::from_secs(60), Duration::from_millis(10), || {
        let s = switched.lock().unwrap();
        victims.iter().all(|&i| s[i].is_some_and(|at| at > t0))
    });
    let mut resumes: Vec<Duration> = {
        let s = switched.lock().unwrap();
        victims
            .iter()
            .filter_map(|&i| s[i].filter(|&at| at > t0).map(|at| at - t0))
            .collect()
    };
    let snapshots = watch.snapshots.load(Ordering::SeqCst) - snapshots_before;
    figures.add(
        format!(
            "{} nodes of a killed gateway resume elsewhere",
            victims.len()
        ),
        format!(
            "{} of {} resumed, p50 {} p99 {} max {} ({snapshots} snapshots)",
            resumes.len(),
            victims.len(),
            ms(percentile(&mut resumes, 50.0)),
            ms(percentile(&mut resumes, 99.0)),
            ms(resumes.last().copied().unwrap_or_default())
        ),
        "p99 <= 3 s, zero snapshots",
    );
    assert!(
        all_back.is_some(),
        "{} of {} nodes of the killed gateway never resumed elsewhere",
        victims.len() - resumes.len(),
        victims.len()
    );
    assert_eq!(
        snapshots, 0,
        "nodes resumed with a snapshot, not their cursor"
    );
    let spread = propagation(&http, &bases[0], &changer, &mut seq, &watch, small, 5).await;
    propagation_figure(
        &mut figures,
        small,
        5,
        spread,
        "after the failover, every node still follows",
    );
    assert_eq!(spread.3, 0, "nodes missed a change after the failover");
    println!(
        "poll errors {}, 503s {}",
        watch.errors.load(Ordering::SeqCst),
        watch.busy.load(Ordering::SeqCst)
    );
    for f in followers {
        f.abort();
    }
    gateways[1].node.restart();
    gateways[1]
        .node
        .recv_until("READY=1", Duration::from_secs(60));
    println!("1,000-node part took {}", ms(started.elapsed()));

    // ---- 10,000 racing joins, a third on each gateway, all at once ----
    let t = Instant::now();
    let per = large / 3;
    let counts = [per, per, large - 2 * per];
    let joins = (0..3).map(|g| {
        let (http, base, token) = (&http, &bases[g], &token);
        async move {
            join_many(
                http,
                base,
                token,
                &format!("race-g{g}-"),
                counts[g],
                counts[g],
            )
            .await
        }
    });
    let joined = futures::future::join_all(joins).await;
    let mut all = Vec::new();
    let mut took = Vec::new();
    let mut retries = 0;
    for (list, d, r) in joined {
        all.extend(list);
        took.extend(d);
        retries += r;
    }
    let (total, unique) = sorted_unique(all.iter().map(|n| n.address.clone()));
    let (_, unique_ids) = sorted_unique(all.iter().map(|n| n.node_id.clone()));
    figures.add(
        format!("{large} racing joins over three gateways"),
        format!(
            "{total} joined in {}, {unique} distinct addresses, {unique_ids} distinct node ids; latency p50 {} p99 {}; {retries} retries",
            ms(t.elapsed()),
            ms(percentile(&mut took, 50.0)),
            ms(percentile(&mut took, 99.0))
        ),
        "no address twice",
    );
    assert_eq!(unique, total, "an address was allocated twice");
    assert_eq!(unique_ids, total, "a node id was given twice");
    // A gateway restarted now loads all of them.
    let t = Instant::now();
    gateways[2].node.stop(Duration::from_secs(30));
    gateways[2].node.restart();
    gateways[2]
        .node
        .recv_until("READY=1", Duration::from_secs(120));
    figures.add(
        format!("a gateway restarted with {} nodes in etcd", small + large),
        format!("READY in {}", ms(t.elapsed())),
        "starts",
    );
    let listed = gateway::cli_ok_in(
        lab.ns(0),
        &gateways[0].node,
        &["gateway", "nodes", "--json"],
    );
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let rows = listed["nodes"].as_array().cloned().unwrap_or_default();
    let mut by_address: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        *by_address.entry(json_text(&row["address"])).or_default() += 1;
    }
    let twice: Vec<_> = by_address.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "the store lists an address twice: {twice:?}"
    );
    assert!(
        rows.len() > small + large,
        "gateway nodes lists {} nodes",
        rows.len()
    );
    println!("whole benchmark took {}", ms(started.elapsed()));
    figures
}
