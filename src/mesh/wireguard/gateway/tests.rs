//! The coordinator against an in-process stand-in gateway (HTTPS under the cluster's root key,
//! signed records): join, cache, restart on the cache, tampering.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::tls::testing::chain_for;
use super::*;
use crate::core::coord::{
    self, JoinResponse, NodeRecord, RecordFields, Role, Secret32, SignerCert, TokenId,
};

const NOW_SLACK: u64 = 30 * 24 * 3600;

/// The cluster: root and one signer, both from fixed seeds.
struct Cluster {
    root_pkcs8: Vec<u8>,
    root: RootKey,
    signer_pkcs8: Vec<u8>,
    signer: SignerCert,
    /// One expiry for every record, so signing a record twice gives the same record.
    not_after: u64,
}

fn cluster() -> Cluster {
    let root_pkcs8 = coord::ed25519_pkcs8_from_seed(&[1; 32]).to_vec();
    let root = RootKey(coord::public_key_of_pkcs8(&root_pkcs8).unwrap());
    let signer_pkcs8 = coord::ed25519_pkcs8_from_seed(&[2; 32]).to_vec();
    let signer_key = coord::public_key_of_pkcs8(&signer_pkcs8).unwrap();
    let signer =
        coord::sign_signer(signer_key, "gw-1", 1, unix_now() + NOW_SLACK, &root_pkcs8).unwrap();
    Cluster {
        root_pkcs8,
        root,
        signer_pkcs8,
        signer,
        not_after: unix_now() + NOW_SLACK,
    }
}

impl Cluster {
    fn record(&self, n: u8) -> NodeRecord {
        self.record_with(n, n, 1)
    }

    /// Node `n` with the WireGuard key `[key; 32]` at `serial`.
    fn record_with(&self, n: u8, key: u8, serial: u64) -> NodeRecord {
        coord::sign_record(
            RecordFields {
                node_id: NodeId(u64::from(n)),
                name: format!("node-{n}"),
                wg_key: PeerKey([key; 32]),
                addresses: vec![format!("10.100.0.{n}").parse().unwrap()],
                roles: vec![Role::Node],
                serial,
                not_after: self.not_after,
                gateway_url: None,
            },
            &self.signer_pkcs8,
        )
        .unwrap()
    }

    fn snapshot(&self, rev: u64, nodes: &[u8]) -> Update {
        Update {
            cursor: Cursor { store_id: 7, rev },
            kind: UpdateKind::Snapshot,
            signers: vec![self.signer.clone()],
            records: nodes.iter().map(|n| self.record(*n)).collect(),
            revocations: Vec::new(),
            adverts: Vec::new(),
            gateways: Vec::new(),
        }
    }
}

/// What the stand-in gateway serves and saw.
#[derive(Default)]
struct Seen {
    joins: usize,
    polls: usize,
    /// Polls without a cursor (each answered with a snapshot).
    fresh_polls: usize,
    /// How the next joins are answered (then 200 with the session).
    join_plan: std::collections::VecDeque<JoinAnswer>,
    adverts: Vec<Advert>,
    /// The highest advert seq held: lower ones are refused with the real gateway's 409.
    advert_last: u64,
    bodies: Vec<Vec<u8>>,
}

enum JoinAnswer {
    /// The connection closes before the answer.
    Lost,
    Refuse(StatusCode, &'static str),
}

struct Gateway {
    url: String,
    seen: Arc<Mutex<Seen>>,
    update: Arc<Mutex<Update>>,
    /// Served instead of `update` to a poll without a cursor, when set.
    full: Arc<Mutex<Option<Update>>>,
    /// The accept loop: aborted, the port is closed (new connections are refused).
    accept: tokio::task::JoinHandle<()>,
}

/// An HTTPS gateway on loopback under `cluster`'s root key. It assigns node 3 the address
/// 10.100.0.3 and serves `update` (an empty delta while the cursor is current).
async fn gateway(cluster: &Cluster, update: Update) -> Gateway {
    let chain = chain_for(&cluster.root_pkcs8);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain.certs, chain.leaf_key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let update = Arc::new(Mutex::new(update));
    let full: Arc<Mutex<Option<Update>>> = Arc::default();
    let joined = JoinResponse {
        node_id: NodeId(3),
        session: "n3.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            .parse()
            .unwrap(),
        record: cluster.record(3),
        mesh_cidr: "10.100.0.0/16".parse().unwrap(),
        gateways: vec![format!("https://{addr}")],
    };
    let (seen2, update2, full2) = (Arc::clone(&seen), Arc::clone(&update), Arc::clone(&full));
    let accept = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let (seen, update, full, joined) = (
                Arc::clone(&seen2),
                Arc::clone(&update2),
                Arc::clone(&full2),
                joined.clone(),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (seen, update, full, joined) = (
                            Arc::clone(&seen),
                            Arc::clone(&update),
                            Arc::clone(&full),
                            joined.clone(),
                        );
                        async move {
                            let path = req.uri().path().to_string();
                            let query = req.uri().query().unwrap_or_default().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            seen.lock().unwrap().bodies.push(body.to_vec());
                            let (status, json) = if path == "/v1/join" {
                                let plan = {
                                    let mut seen = seen.lock().unwrap();
                                    seen.joins += 1;
                                    seen.join_plan.pop_front()
                                };
                                match plan {
                                    // The join is done, but the answer never arrives.
                                    Some(JoinAnswer::Lost) => {
                                        return Err(std::io::Error::other("answer lost"));
                                    }
                                    Some(JoinAnswer::Refuse(status, error)) => (
                                        status,
                                        serde_json::to_vec(&coord::ErrorBody {
                                            error: error.to_string(),
                                            retry: false,
                                            last_seq: None,
                                        })
                                        .unwrap(),
                                    ),
                                    None => (StatusCode::OK, serde_json::to_vec(&joined).unwrap()),
                                }
                            } else if path == "/v1/peers" {
                                seen.lock().unwrap().polls += 1;
                                let current = update.lock().unwrap().clone();
                                let fresh = !query.contains("cursor=");
                                if fresh {
                                    seen.lock().unwrap().fresh_polls += 1;
                                }
                                if let Some(full) = full.lock().unwrap().clone().filter(|_| fresh) {
                                    (StatusCode::OK, serde_json::to_vec(&full).unwrap())
                                } else if query.contains(&format!("cursor={}", current.cursor)) {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    let empty = Update::empty_delta(current.cursor, Vec::new());
                                    (StatusCode::OK, serde_json::to_vec(&empty).unwrap())
                                } else {
                                    (StatusCode::OK, serde_json::to_vec(&current).unwrap())
                                }
                            } else if let Some(name) = path.strip_prefix("/v1/services/") {
                                let answer = coord::ServiceAnswer {
                                    services: vec![ServiceInstance {
                                        name: name.to_string(),
                                        node: "node-1".into(),
                                        address: "10.100.0.1".parse().unwrap(),
                                        port: 8443,
                                    }],
                                };
                                (StatusCode::OK, serde_json::to_vec(&answer).unwrap())
                            } else if path == "/v1/self" {
                                let advert: Advert = serde_json::from_slice(&body).unwrap();
                                let mut seen = seen.lock().unwrap();
                                if advert.seq <= seen.advert_last {
                                    let stale = crate::gateway::store::AdvertError::Stale {
                                        got: advert.seq,
                                        last: seen.advert_last,
                                    };
                                    let body = coord::ErrorBody {
                                        error: stale.to_string(),
                                        retry: false,
                                        last_seq: Some(seen.advert_last),
                                    };
                                    (StatusCode::CONFLICT, serde_json::to_vec(&body).unwrap())
                                } else {
                                    seen.advert_last = advert.seq;
                                    seen.adverts.push(advert);
                                    (StatusCode::NO_CONTENT, Vec::new())
                                }
                            } else {
                                (
                                    StatusCode::NOT_FOUND,
                                    b"{\"error\":\"no such endpoint\",\"retry\":false}".to_vec(),
                                )
                            };
                            Ok::<_, std::io::Error>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(json)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Gateway {
        url: format!("https://{addr}"),
        seen,
        update,
        full,
        accept,
    }
}

fn config(state_dir: &Path, token_file: &Path) -> Config {
    let text = format!(
        "[node]\nname = \"gpu-03\"\nstate_dir = \"{}\"\n[network.wireguard]\njoin_token_file = \"{}\"\npeers_dir = \"{}/none\"\n",
        state_dir.display(),
        token_file.display(),
        state_dir.display()
    );
    crate::config::parse(Path::new("test.toml"), &text).unwrap()
}

fn me() -> NodeIdentity {
    NodeIdentity {
        name: "gpu-03".into(),
        wg_key: PeerKey([3; 32]),
        listen_port: 51820,
        interface: "wgtest-none".into(),
    }
}

fn no_gpus() -> GpuWatch {
    crate::mesh::GpuSummaryCell::default().subscribe()
}

fn token(cluster: &Cluster, url: &str) -> String {
    JoinToken {
        id: TokenId([9; 8]),
        secret: Secret32([4; 32]),
        root: cluster.root,
        urls: vec![url.to_string()],
    }
    .to_string()
}

/// A node's state directory with a token for the gateway at `url` in it.
fn token_dir(cluster: &Cluster, url: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token(cluster, url)).unwrap();
    (dir, token_file)
}

/// A node that joined the gateway at `url`, followed it until its cache was written, and
/// stopped.
async fn joined_then_stopped(cluster: &Cluster, url: &str) -> (tempfile::TempDir, PathBuf) {
    let (dir, token_file) = token_dir(cluster, url);
    let (recheck, _rechecks) = Recheck::channel();
    let first = Coordinator::start(&config(dir.path(), &token_file), &me(), recheck, no_gpus())
        .await
        .unwrap()
        .unwrap();
    until("the snapshot", || first.shared.mode() == Mode::Live).await;
    until("the cache", || cache_path(dir.path()).exists()).await;
    drop(first);
    (dir, token_file)
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn names(shared: &Shared) -> Vec<String> {
    let mut names: Vec<String> = shared
        .peers(unix_now())
        .into_iter()
        .map(|p| p.name)
        .collect();
    names.sort();
    names
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_node_with_a_token_joins_keeps_a_private_session_and_follows_the_peer_set() {
    let cluster = cluster();
    let gw = gateway(&cluster, cluster.snapshot(1, &[1, 2, 3])).await;
    let (dir, token_file) = token_dir(&cluster, &gw.url);
    let (recheck, mut rechecks) = Recheck::channel();
    let gpus = crate::mesh::GpuSummaryCell::default();

    let coordinator = Coordinator::start(
        &config(dir.path(), &token_file),
        &me(),
        recheck,
        gpus.subscribe(),
    )
    .await
    .unwrap()
    .unwrap();

    assert_eq!(coordinator.address().to_string(), "10.100.0.3/16");
    // The first peer set is there when the join returns, so READY comes with the peers.
    assert_eq!(coordinator.shared.mode(), Mode::Live);
    assert_eq!(names(&coordinator.shared), ["node-1", "node-2"]);
    let session = session_path(dir.path());
    assert_eq!(mode_of(&session), 0o600);
    until("the snapshot", || coordinator.shared.mode() == Mode::Live).await;
    assert!(
        rechecks.recv().await.is_some(),
        "no reconcile was requested"
    );
    // This node itself is not its own peer.
    assert_eq!(names(&coordinator.shared), ["node-1", "node-2"]);
    let cache = cache_path(dir.path());
    assert_eq!(mode_of(&cache), 0o600);
    assert_eq!(coordinator.shared.status_note(), "gateway peers live");

    // A fourth node appears: applied from the next answer.
    *gw.update.lock().unwrap() = cluster.snapshot(2, &[1, 2, 3, 4]);
    until("node-4", || names(&coordinator.shared).len() == 3).await;
    let doc = coordinator.shared.doc(unix_now());
    assert_eq!((doc.state.as_str(), doc.peers), ("live", 3));
    assert_eq!(
        doc.cursor,
        Some(
            Cursor {
                store_id: 7,
                rev: 2
            }
            .to_string()
        )
    );

    // The services the node publishes go out as one advert, not again while unchanged.
    coordinator
        .shared
        .set_services(vec![("molt-provider".into(), 8080)]);
    until("the advert", || {
        gw.seen
            .lock()
            .unwrap()
            .adverts
            .iter()
            .any(|a| !a.services.is_empty())
    })
    .await;
    let sent = gw.seen.lock().unwrap().adverts.len();
    coordinator
        .shared
        .set_services(vec![("molt-provider".into(), 8080)]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(gw.seen.lock().unwrap().adverts.len(), sent);

    // So does a changed GPU inventory, with a higher sequence number.
    gpus.set(Some((2, "NVIDIA H100".into(), 163_840)));
    until("the GPU advert", || {
        gw.seen.lock().unwrap().adverts.len() == sent + 1
    })
    .await;
    let adverts = gw.seen.lock().unwrap().adverts.clone();
    let last = adverts.last().unwrap();
    assert_eq!(last.gpus.as_ref().map(|g| g.count), Some(2));
    assert!(last.seq > adverts[adverts.len() - 2].seq);
    gpus.set(Some((2, "NVIDIA H100".into(), 163_840)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.seen.lock().unwrap().adverts.len(), sent + 1);
    assert_eq!(gw.seen.lock().unwrap().joins, 1);
}

#[tokio::test]
async fn a_peer_refused_from_a_delta_arrives_with_the_next_snapshot_without_a_snapshot_storm() {
    let cluster = cluster();
    let gw = gateway(&cluster, cluster.snapshot(1, &[1, 2, 3])).await;
    let (dir, token_file) = token_dir(&cluster, &gw.url);
    let (recheck, _rechecks) = Recheck::channel();
    let node = Coordinator::start(&config(dir.path(), &token_file), &me(), recheck, no_gpus())
        .await
        .unwrap()
        .unwrap();
    until("the snapshot", || {
        names(&node.shared) == ["node-1", "node-2"]
    })
    .await;

    // node-2 hands its key on to the new node-5, but the delta lists node-5 first: node-5 is
    // refused (the key is still node-2's) and node-2's new key is taken.
    let mut delta = cluster.snapshot(2, &[]);
    delta.kind = UpdateKind::Delta;
    delta.records = vec![cluster.record_with(5, 2, 1), cluster.record_with(2, 22, 2)];
    let mut snapshot = cluster.snapshot(2, &[1, 3]);
    snapshot.records.push(cluster.record_with(2, 22, 2));
    snapshot.records.push(cluster.record_with(5, 2, 1));
    *gw.full.lock().unwrap() = Some(snapshot);
    *gw.update.lock().unwrap() = delta;
    until("node-5", || {
        names(&node.shared) == ["node-1", "node-2", "node-5"]
    })
    .await;
    assert!(
        node.shared.problems().is_empty(),
        "{:?}",
        node.shared.problems()
    );

    // A snapshot that still has a refusal keeps its cursor (asking again would bring the same)
    // and says what was left out.
    let mut bad = cluster.snapshot(3, &[1, 3]);
    bad.records.push(cluster.record_with(6, 1, 1));
    *gw.full.lock().unwrap() = Some(bad.clone());
    *gw.update.lock().unwrap() = bad;
    until("the refusal in problems", || {
        node.shared
            .problems()
            .iter()
            .any(|p| p.contains("left out record n6"))
    })
    .await;
    let fresh = gw.seen.lock().unwrap().fresh_polls;
    let polls = gw.seen.lock().unwrap().polls;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.seen.lock().unwrap().fresh_polls, fresh);
    assert!(gw.seen.lock().unwrap().polls > polls);
    assert_eq!(
        node.shared.doc(unix_now()).cursor,
        Some(
            Cursor {
                store_id: 7,
                rev: 3
            }
            .to_string()
        )
    );
}

#[tokio::test]
async fn a_node_restarted_with_its_clock_stepped_back_still_gets_its_services_advertised() {
    let cluster = cluster();
    let gw = gateway(&cluster, cluster.snapshot(1, &[1, 2, 3])).await;
    // Adverts from before the restart, an hour ahead of this node's clock now.
    let last = unix_now_ms() + 3_600_000;
    gw.seen.lock().unwrap().advert_last = last;
    let (dir, token_file) = token_dir(&cluster, &gw.url);
    let (recheck, _rechecks) = Recheck::channel();
    let node = Coordinator::start(&config(dir.path(), &token_file), &me(), recheck, no_gpus())
        .await
        .unwrap()
        .unwrap();

    node.shared
        .set_services(vec![("molt-provider".into(), 8080)]);
    until("the advert with the service", || {
        gw.seen
            .lock()
            .unwrap()
            .adverts
            .iter()
            .any(|a| !a.services.is_empty())
    })
    .await;
    assert!(gw.seen.lock().unwrap().adverts.iter().all(|a| a.seq > last));
}

/// A runtime with one thread, like the daemon's.
#[tokio::test(flavor = "current_thread")]
async fn status_keeps_answering_while_a_large_snapshot_is_verified() {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicBool, Ordering};

    let cluster = cluster();
    let mut snapshot = cluster.snapshot(1, &[]);
    for i in 0..5_000u16 {
        let mut key = [7u8; 32];
        key[..2].copy_from_slice(&i.to_be_bytes());
        snapshot.records.push(
            coord::sign_record(
                RecordFields {
                    node_id: NodeId(1_000 + u64::from(i)),
                    name: format!("node-{i}"),
                    wg_key: PeerKey(key),
                    addresses: vec![
                        format!("10.100.{}.{}", i / 250 + 1, i % 250 + 1)
                            .parse()
                            .unwrap(),
                    ],
                    roles: vec![Role::Node],
                    serial: 1,
                    not_after: cluster.not_after,
                    gateway_url: None,
                },
                &cluster.signer_pkcs8,
            )
            .unwrap(),
        );
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&serde_json::to_vec(&snapshot).unwrap())
        .unwrap();
    let raw = Raw {
        bytes: Bytes::from(gz.finish().unwrap()),
        gzip: true,
    };
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            set: PeerSet::new(cluster.root),
            own: NodeId(3),
            mode: Mode::Joining,
            since: unix_now(),
            cursor: None,
            answered_at: None,
            url: None,
            snapshots: 0,
            deltas: 0,
            grace_s: 0,
            problems: Vec::new(),
            services: Vec::new(),
            gpus: None,
            gateways: Vec::new(),
            current: None,
            bootstrap: Vec::new(),
        }),
        advert_changed: tokio::sync::Notify::new(),
    });

    // Another task on the same thread (the supervisor, the status API) ticks every millisecond
    // and notes its longest wait.
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = tokio::spawn({
        let stop = Arc::clone(&stop);
        async move {
            let mut longest = Duration::ZERO;
            let mut last = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                longest = longest.max(last.elapsed());
                last = std::time::Instant::now();
            }
            longest
        }
    });
    tokio::task::yield_now().await;
    let started = std::time::Instant::now();
    let done = apply_answer(&shared, "https://203.0.113.1:443", raw, unix_now())
        .await
        .unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let longest = ticker.await.unwrap();

    assert!(done.touched && done.came_back && done.cache.is_some());
    assert_eq!(shared.peers(unix_now()).len(), 5_000);
    assert_eq!(shared.mode(), Mode::Live);
    assert!(
        longest * 4 < took,
        "the other task waited {longest:?} while the snapshot took {took:?}"
    );
}

#[tokio::test]
async fn a_join_whose_answer_was_lost_is_retried_with_the_same_token_and_a_refusal_needs_the_operator()
 {
    let cluster = cluster();
    let gw = gateway(&cluster, cluster.snapshot(1, &[1, 2, 3])).await;
    gw.seen
        .lock()
        .unwrap()
        .join_plan
        .push_back(JoinAnswer::Lost);
    let (dir, token_file) = token_dir(&cluster, &gw.url);
    let (recheck, _rechecks) = Recheck::channel();
    let config = config(dir.path(), &token_file);

    // The answer is lost: worth retrying, and no session is kept.
    let lost = Coordinator::start(&config, &me(), recheck.clone(), no_gpus())
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(lost.retry(), Retry::Transient, "{lost}");
    assert!(load_session(dir.path()).unwrap().is_none());

    // The retry (the supervisor's) sends the same token, name and key, and joins.
    let node = Coordinator::start(&config, &me(), recheck.clone(), no_gpus())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(node.session.node_id, NodeId(3));
    let joins: Vec<JoinRequest> = gw
        .seen
        .lock()
        .unwrap()
        .bodies
        .iter()
        .filter_map(|b| serde_json::from_slice(b).ok())
        .collect();
    assert_eq!(joins.len(), 2);
    assert_eq!(joins[0].token_id, joins[1].token_id);
    assert_eq!(joins[0].token_secret, joins[1].token_secret);
    assert_eq!(
        (&joins[0].name, joins[0].wg_key),
        (&joins[1].name, joins[1].wg_key)
    );
    drop(node);

    // A refusal is for the operator, with the gateway's reason.
    let other = tempfile::tempdir().unwrap();
    gw.seen
        .lock()
        .unwrap()
        .join_plan
        .push_back(JoinAnswer::Refuse(
            StatusCode::FORBIDDEN,
            "token already used",
        ));
    let refused = Coordinator::start(
        &super::tests::config(other.path(), &token_file),
        &me(),
        recheck,
        no_gpus(),
    )
    .await
    .map(|_| ())
    .unwrap_err();
    assert_eq!(refused.retry(), Retry::NeedsOperator, "{refused}");
    assert!(
        refused.to_string().contains("token already used"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_restarted_node_runs_on_its_cached_peers_while_no_gateway_answers() {
    let cluster = cluster();
    let gw = gateway(&cluster, cluster.snapshot(1, &[1, 2, 3])).await;
    let (dir, token_file) = joined_then_stopped(&cluster, &gw.url).await;
    let (recheck, _rechecks) = Recheck::channel();

    // The gateway is gone: the session points at a closed port.
    let mut session = load_session(dir.path()).unwrap().unwrap();
    session.gateways = vec!["https://127.0.0.1:9".into()];
    save_json(&session_path(dir.path()), &session).unwrap();
    // The token is not needed again.
    std::fs::remove_file(&token_file).unwrap();

    let again = Coordinator::start(&config(dir.path(), &token_file), &me(), recheck, no_gpus())
        .await
        .unwrap()
        .unwrap();

    // Before any gateway could have answered.
    assert_eq!(names(&again.shared), ["node-1", "node-2"]);
    assert_eq!(again.shared.mode(), Mode::Cached);
    assert!(
        again
            .shared
            .status_note()
            .starts_with("on cached peer set since "),
        "{}",
        again.shared.status_note()
    );
    assert!(
        again
            .shared
            .status_note()
            .ends_with("(gateway unreachable)")
    );
    assert_eq!(gw.seen.lock().unwrap().joins, 1);
}

#[tokio::test]
async fn a_node_restarted_while_its_gateways_are_down_fails_over_to_one_it_learned_with_its_cursor()
{
    let cluster = cluster();
    // Three gateways serve one store (one cursor). The node joins through gateway 1 and learns
    // gateway 2 from the signed record of gateway 2's own node, gateway 3 from the answer's
    // list of live gateways.
    let gw2 = gateway(&cluster, cluster.snapshot(1, &[1, 3])).await;
    let gw3 = gateway(&cluster, cluster.snapshot(1, &[1, 3])).await;
    let gw2_record = coord::sign_record(
        RecordFields {
            roles: vec![Role::Node, Role::Gateway],
            gateway_url: Some(gw2.url.clone()),
            ..cluster.record(2).fields()
        },
        &cluster.signer_pkcs8,
    )
    .unwrap();
    let mut first = cluster.snapshot(1, &[1, 3]);
    first.records.push(gw2_record);
    first.gateways = vec![gw3.url.clone()];
    *gw2.update.lock().unwrap() = first.clone();
    *gw3.update.lock().unwrap() = first.clone();
    let gw1 = gateway(&cluster, first).await;
    let (dir, token_file) = joined_then_stopped(&cluster, &gw1.url).await;
    let cache: CacheFile =
        serde_json::from_slice(&std::fs::read(cache_path(dir.path())).unwrap()).unwrap();
    // The one that answered, the signed record's, then the answer's list.
    assert_eq!(
        cache.gateways,
        [gw1.url.clone(), gw2.url.clone(), gw3.url.clone()]
    );
    assert_eq!(cache.gateway.as_deref(), Some(gw1.url.as_str()));

    // Gateways 1 and 2 go down; only the cache still names gateway 3.
    gw1.accept.abort();
    gw2.accept.abort();
    let (recheck, _rechecks) = Recheck::channel();
    let again = Coordinator::start(&config(dir.path(), &token_file), &me(), recheck, no_gpus())
        .await
        .unwrap()
        .unwrap();
    until("the answer of gateway 3", || {
        again.shared.doc(unix_now()).url.as_deref() == Some(gw3.url.as_str())
    })
    .await;
    let doc = again.shared.doc(unix_now());
    assert_eq!(doc.state, "live");
    assert_eq!(
        doc.gateways,
        [gw3.url.clone(), gw2.url.clone(), gw1.url.clone()]
    );
    assert_eq!(doc.current.as_deref(), Some(gw3.url.as_str()));
    assert_eq!(doc.snapshots, 0, "resumed with the cached cursor: {doc:?}");
    let (polls, fresh_polls) = {
        let seen = gw3.seen.lock().unwrap();
        (seen.polls, seen.fresh_polls)
    };
    assert!(polls >= 1);
    assert_eq!(fresh_polls, 0, "gateway 3 never sent a snapshot");
    assert_eq!(names(&again.shared), ["node-1", "node-2"]);
    // The cache is written just after the answer is applied.
    until("the cache to name gateway 3", || {
        std::fs::read(cache_path(dir.path()))
            .ok()
            .and_then(|b| serde_json::from_slice::<CacheFile>(&b).ok())
            .is_some_and(|c| c.gateway.as_deref() == Some(gw3.url.as_str()))
    })
    .await;
    drop(again);

    // `services discover` also finds gateway 3 while the session's gateway is down.
    let session = load_session(dir.path()).unwrap().unwrap();
    assert_eq!(session.gateways, std::slice::from_ref(&gw1.url));
    let known = known_gateway_urls(dir.path(), &session);
    assert_eq!(known[0], gw3.url, "the last that answered first: {known:?}");
    let found = discover(&session, &known, "molt-provider").await.unwrap();
    assert_eq!(found[0].node, "node-1");
}

#[tokio::test]
async fn a_node_keeps_every_gateway_of_its_token_beside_those_the_join_answer_lists() {
    let cluster = cluster();
    let gw = gateway(&cluster, cluster.snapshot(1, &[1, 3])).await;
    let down = "https://127.0.0.1:9".to_string();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let token = JoinToken {
        id: TokenId([9; 8]),
        secret: Secret32([4; 32]),
        root: cluster.root,
        urls: vec![down.clone(), gw.url.clone()],
    };
    std::fs::write(&token_file, token.to_string()).unwrap();
    let (recheck, _rechecks) = Recheck::channel();
    let node = Coordinator::start(&config(dir.path(), &token_file), &me(), recheck, no_gpus())
        .await
        .unwrap()
        .unwrap();
    // The join answer lists only the gateway that answered; the one down stays known.
    assert_eq!(node.session.gateways, [gw.url.clone(), down]);
}

#[tokio::test]
async fn a_tampered_peer_cache_is_refused_before_its_peers_are_applied() {
    let cluster = cluster();
    let mut set = PeerSet::new(cluster.root);
    set.apply(&cluster.snapshot(1, &[1, 2]), unix_now());
    let good = set.to_cache(
        Cursor {
            store_id: 7,
            rev: 1,
        },
        unix_now(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peerset.json");

    // A record moved to another key (someone wants to be node-2).
    let mut json: serde_json::Value = serde_json::to_value(&good).unwrap();
    json["records"][1]["wg_key"] = serde_json::Value::String(base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        [66u8; 32],
    ));
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    let (set, _, rejected) = load_cache(&path, cluster.root).unwrap().unwrap();
    let peers: Vec<String> = set
        .peers(unix_now(), Grace::Live)
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(peers, ["node-1"]);
    assert_eq!(rejected.len(), 1, "{rejected:?}");

    // A cache of another cluster is refused whole.
    std::fs::write(&path, serde_json::to_vec(&good).unwrap()).unwrap();
    let error = load_cache(&path, RootKey([5; 32])).map(|_| ()).unwrap_err();
    assert!(error.contains("another cluster"), "{error}");

    // Garbage is refused, not half-read.
    std::fs::write(&path, b"{\"version\":1,").unwrap();
    assert!(load_cache(&path, cluster.root).is_err());
}

// ---- against the real gateway (src/gateway), in-process ----

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn real_gateway_config(dir: &Path, port: u16) -> Config {
    let text = format!(
        "[node]\nname = \"gw\"\nstate_dir = \"{0}/state\"\n[network]\nprovider = \"wireguard\"\n[network.wireguard]\naddress = \"10.100.0.1/16\"\nprivate_key_file = \"{0}/wg.key\"\n[gateway]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"https://127.0.0.1:{port}\"\n",
        dir.display()
    );
    crate::config::parse(Path::new("gw.toml"), &text).unwrap()
}

fn node_config(dir: &Path, name: &str, token_file: &Path) -> Config {
    let text = format!(
        "[node]\nname = \"{name}\"\nstate_dir = \"{0}/{name}\"\n[network.wireguard]\njoin_token_file = \"{1}\"\npeers_dir = \"{0}/none\"\n",
        dir.display(),
        token_file.display()
    );
    crate::config::parse(Path::new("node.toml"), &text).unwrap()
}

fn identity(name: &str, n: u8) -> NodeIdentity {
    NodeIdentity {
        name: name.into(),
        wg_key: PeerKey([n; 32]),
        listen_port: 51820,
        interface: "wgtest-none".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_joining_the_real_gateway_see_each_other_find_services_in_one_request_and_lose_a_revoked_node()
 {
    let dir = tempfile::tempdir().unwrap();
    let gw_config = real_gateway_config(dir.path(), free_port());
    crate::gateway::init(&gw_config, unix_now()).unwrap();
    let _running = crate::gateway::start(&gw_config, PeerKey([1; 32]))
        .await
        .unwrap();
    let (token, _) =
        crate::gateway::create_token(&gw_config, Duration::from_secs(3600), 2, unix_now()).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token.to_string()).unwrap();
    let (recheck, _rx) = Recheck::channel();

    let a = Coordinator::start(
        &node_config(dir.path(), "node-a", &token_file),
        &identity("node-a", 10),
        recheck.clone(),
        no_gpus(),
    )
    .await
    .unwrap()
    .unwrap();
    until("node-a's first answer", || a.shared.mode() == Mode::Live).await;
    assert_eq!(names(&a.shared), ["gw"]);

    let joined = std::time::Instant::now();
    let b = Coordinator::start(
        &node_config(dir.path(), "node-b", &token_file),
        &identity("node-b", 11),
        recheck.clone(),
        no_gpus(),
    )
    .await
    .unwrap()
    .unwrap();
    until("node-b at node-a", || {
        names(&a.shared).contains(&"node-b".to_string())
    })
    .await;
    let propagated = joined.elapsed();
    assert!(b.address() != a.address());
    until("node-a at node-b", || {
        names(&b.shared).contains(&"node-a".to_string())
    })
    .await;

    // node-b's services reach the gateway in its advert; node-a finds them in one request.
    b.shared.set_services(vec![("molt-provider".into(), 8443)]);
    let mut found = Vec::new();
    for _ in 0..100 {
        found = discover(&a.session, &a.session.gateways, "molt-provider")
            .await
            .unwrap();
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].node.as_str(), found[0].port), ("node-b", 8443));
    assert_eq!(found[0].address, b.address().addr());

    // The token had two uses.
    let refused = Coordinator::start(
        &node_config(dir.path(), "node-c", &token_file),
        &identity("node-c", 12),
        recheck.clone(),
        no_gpus(),
    )
    .await
    .map(|_| ())
    .unwrap_err();
    assert_eq!(refused.retry(), Retry::NeedsOperator);
    assert!(refused.message().contains("token"), "{}", refused.message());

    let revoked = std::time::Instant::now();
    crate::gateway::revoke(&gw_config, "node-b").unwrap();
    until("node-b gone at node-a", || {
        !names(&a.shared).contains(&"node-b".to_string())
    })
    .await;
    let dropped = revoked.elapsed();
    println!(
        "join seen by another node after {propagated:?}; revocation applied after {dropped:?}"
    );
}

#[tokio::test]
async fn a_node_that_left_part_of_its_cache_out_gets_the_real_record_back_from_the_gateway() {
    let cluster = cluster();
    let gw = gateway(&cluster, cluster.snapshot(1, &[1, 2, 3])).await;
    let (dir, token_file) = joined_then_stopped(&cluster, &gw.url).await;
    let (recheck, _rechecks) = Recheck::channel();
    // node-2's record is forged in the cache; the gateway's cursor has not moved since.
    let path = cache_path(dir.path());
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for record in json["records"].as_array_mut().unwrap() {
        if record["name"] == "node-2" {
            record["wg_key"] = serde_json::Value::String(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                [66u8; 32],
            ));
        }
    }
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();

    let again = Coordinator::start(&config(dir.path(), &token_file), &me(), recheck, no_gpus())
        .await
        .unwrap()
        .unwrap();

    assert_eq!(
        names(&again.shared),
        ["node-1"],
        "the forged record was applied"
    );
    // A current cursor would get "nothing changed": the node must ask for a snapshot.
    until("node-2's real record", || {
        names(&again.shared) == ["node-1", "node-2"]
    })
    .await;
    let real = again.shared.peers(unix_now());
    assert!(real.iter().all(|p| p.key != PeerKey([66; 32])));
}
