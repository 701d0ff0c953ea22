//! Two gateways on one real three-member etcd cluster (tests/support/etcd.rs): gateway A runs
//! in this process (`gateway::start`), gateway B in a child process (this test binary re-run
//! as the ignored `gateway_process`) so it can die by SIGKILL. Nodes are simulated over
//! HTTPS: what matters here is what each gateway answers.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::support::etcd::EtcdCluster;
use crate::support::{BIN, free_port};

type Https = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

const CHILD_CONFIG: &str = "CLAWNODE_TEST_GATEWAY_CONFIG";

/// A gateway's config: etcd store, HTTPS on loopback at `port`, mesh address `mesh`.
fn write_config(dir: &Path, name: &str, port: u16, mesh: &str, endpoints: &[String]) -> PathBuf {
    let d = dir.display();
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let text = format!(
        r#"
[node]
name = "{name}"
state_dir = "{d}/state"
runtime_dir = "{d}/run"

[network]
provider = "wireguard"

[network.wireguard]
address = "{mesh}/16"
mesh_cidr = "10.100.0.0/16"
private_key_file = "{d}/wg.key"

[gateway]
enabled = true
listen = "127.0.0.1:{port}"
public_url = "https://127.0.0.1:{port}"
store = "etcd"
etcd_endpoints = [{}]
"#,
        endpoints.join(", ")
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("clawnode.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn cli_ok(config: &Path, args: &[&str]) -> String {
    let out = cli(config, args);
    assert!(
        out.status.success(),
        "clawnode {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_json(config: &Path) -> Value {
    serde_json::from_str(&cli_ok(config, &["gateway", "status", "--json"])).unwrap()
}

fn alive_urls(status: &Value) -> Vec<String> {
    status["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["url"].as_str().unwrap().to_owned())
        .collect()
}

/// The gateway as a process of its own: run only when the parent test sets `CHILD_CONFIG`.
#[test]
#[ignore = "a helper: gateway_etcd's tests run it as a child process"]
fn gateway_process() {
    let Some(path) = std::env::var_os(CHILD_CONFIG) else {
        return;
    };
    let config = clawnode::config::load(Path::new(&path)).unwrap();
    let key = clawnode::core::peer_diff::PeerKey([2; 32]);
    let gateway = clawnode::gateway::spawn(config, key).unwrap();
    println!("listening {}", gateway.addr);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

struct ChildGateway(Child);

impl ChildGateway {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "gateway_etcd::gateway_process",
                "--nocapture",
            ])
            .env(CHILD_CONFIG, config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            let line = lines
                .next()
                .expect("the child gateway ended before it listened")
                .unwrap();
            if line.starts_with("listening ") {
                break;
            }
        }
        // Keep reading so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        self.kill();
    }
}

fn https(ca: &Path) -> Https {
    let tls = crate::support::gateway::tls_trusting(ca);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

struct Answer {
    status: StatusCode,
    retry_after: Option<u64>,
    body: Value,
}

async fn send(
    http: &Https,
    url: &str,
    method: Method,
    session: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(s) = session {
        req = req.header("authorization", format!("Bearer {s}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = tokio::time::timeout(
        Duration::from_secs(40),
        http.request(req.body(Full::new(Bytes::from(body))).unwrap()),
    )
    .await
    .expect("the gateway answers within 40 s")
    .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        retry_after: parts
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok()),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

struct Node {
    session: String,
    name: String,
}

async fn join(http: &Https, base: &str, token: &str, name: &str, n: u8) -> Answer {
    let parts: Vec<&str> = token.split('.').collect();
    let mut wg = [n; 32];
    wg[0] = 0x77;
    use base64::Engine as _;
    let body = serde_json::json!({
        "token_id": parts[1], "token_secret": parts[2], "name": name,
        "wg_key": base64::engine::general_purpose::STANDARD.encode(wg),
        "endpoints": [], "requested_address": null,
    });
    send(
        http,
        &format!("{base}/v1/join"),
        Method::POST,
        None,
        Some(body),
    )
    .await
}

async fn join_ok(http: &Https, base: &str, token: &str, name: &str, n: u8) -> Node {
    let answer = join(http, base, token, name, n).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "join {name}: {}",
        answer.body
    );
    Node {
        session: answer.body["session"].as_str().unwrap().to_owned(),
        name: name.to_owned(),
    }
}

/// `GET url` with `node`'s session.
async fn get(http: &Https, url: &str, node: &Node) -> Answer {
    send(http, url, Method::GET, Some(&node.session), None).await
}

/// The gateway's `GET /v1/status`, asked with `node`'s session.
async fn status(http: &Https, base: &str, node: &Node) -> Answer {
    get(http, &format!("{base}/v1/status"), node).await
}

async fn peers(http: &Https, base: &str, node: &Node, cursor: Option<&str>, wait: u64) -> Answer {
    let query = match cursor {
        Some(c) => format!("?cursor={c}&wait={wait}"),
        None => format!("?wait={wait}"),
    };
    get(http, &format!("{base}/v1/peers{query}"), node).await
}

fn names(update: &Value) -> Vec<String> {
    update["records"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|r| r["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn cursor_of(update: &Value) -> String {
    update["cursor"].as_str().unwrap().to_owned()
}

/// `store.rev` → the same store, `rev + ahead`.
fn cursor_ahead(cursor: &str, ahead: u64) -> String {
    let (store, rev) = cursor.rsplit_once('.').unwrap();
    format!("{store}.{}", rev.parse::<u64>().unwrap() + ahead)
}

struct Setup {
    _dir: tempfile::TempDir,
    a_config: PathBuf,
    b_config: PathBuf,
    a_url: String,
    b_url: String,
    ca: PathBuf,
}

impl Setup {
    /// Gateway A, in this process.
    async fn start_a(&self) -> clawnode::gateway::Running {
        let config = clawnode::config::load(&self.a_config).unwrap();
        clawnode::gateway::start(&config, clawnode::core::peer_diff::PeerKey([1; 32]))
            .await
            .unwrap()
    }

    /// A join token for five nodes, created on A.
    fn token(&self) -> String {
        let doc: Value = serde_json::from_str(&cli_ok(
            &self.a_config,
            &["gateway", "token", "create", "--uses", "5", "--json"],
        ))
        .unwrap();
        doc["token"].as_str().unwrap().to_owned()
    }
}

/// `gateway init` for A, `gateway signer add` on A writing B's gateway directory.
fn setup(cluster: &EtcdCluster) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let a_config = write_config(
        &dir.path().join("a"),
        "gw-a",
        pa,
        "10.100.0.1",
        &cluster.endpoints(),
    );
    let b_config = write_config(
        &dir.path().join("b"),
        "gw-b",
        pb,
        "10.100.0.2",
        &cluster.endpoints(),
    );
    cli_ok(&a_config, &["gateway", "init"]);
    // A second init on the same prefix is refused: the prefix holds a cluster.
    let c_config = write_config(
        &dir.path().join("c"),
        "gw-c",
        free_port(),
        "10.100.0.3",
        &cluster.endpoints(),
    );
    let again = cli(&c_config, &["gateway", "init"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("signer add"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Nothing is left behind that would make `gateway init` say it is initialised already.
    assert!(!dir.path().join("c/state/gateway/root.key").exists());
    let b_state = dir.path().join("b/state");
    std::fs::create_dir_all(&b_state).unwrap();
    let b_url = format!("https://127.0.0.1:{pb}");
    cli_ok(
        &a_config,
        &[
            "gateway",
            "signer",
            "add",
            "gw-b",
            "--url",
            &b_url,
            "--address",
            "10.100.0.2",
            "--out",
            b_state.join("gateway").to_str().unwrap(),
        ],
    );
    let list = cli_ok(&a_config, &["gateway", "signer", "list"]);
    assert!(list.contains("gw-a") && list.contains("gw-b"), "{list}");
    Setup {
        ca: dir.path().join("a/state/gateway/ca.pem"),
        a_url: format!("https://127.0.0.1:{pa}"),
        b_url,
        a_config,
        b_config,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_etcd_serve_one_mesh_and_a_dead_one_leaves_the_list() {
    if EtcdCluster::missing() {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let s = setup(&cluster);
    let _a = s.start_a().await;
    let mut b = ChildGateway::start(&s.b_config);
    let http = https(&s.ca);
    let token = s.token();
    // The token names this gateway first, then the others alive, for a join while A is down.
    let parsed: clawnode::core::coord::JoinToken = token.parse().unwrap();
    assert_eq!(parsed.urls, vec![s.a_url.clone(), s.b_url.clone()]);

    // y joined through A, takes its snapshot from A, then long-polls B with that cursor.
    let y = join_ok(&http, &s.a_url, &token, "node-y", 1).await;
    let first = peers(&http, &s.a_url, &y, None, 0).await;
    assert_eq!(first.body["kind"], "snapshot");
    let mut c0 = cursor_of(&first.body);
    // A's view takes its own join in within its merge window: y is current once it has it.
    if !names(&first.body).contains(&y.name) {
        let delta = peers(&http, &s.a_url, &y, Some(&c0), 5).await;
        assert!(names(&delta.body).contains(&y.name), "{}", delta.body);
        c0 = cursor_of(&delta.body);
    }
    let started = Instant::now();
    let on_b = {
        let (http, b_url, session, c0) =
            (http.clone(), s.b_url.clone(), y.session.clone(), c0.clone());
        tokio::spawn(async move {
            let y = Node {
                session,
                name: "node-y".into(),
            };
            // A node that joined through A polls B at once: B learns its session.
            let mut answer = peers(&http, &b_url, &y, Some(&c0), 20).await;
            while answer.status == StatusCode::UNAUTHORIZED
                && started.elapsed() < Duration::from_secs(1)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
                answer = peers(&http, &b_url, &y, Some(&c0), 20).await;
            }
            answer
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let x = join_ok(&http, &s.a_url, &token, "node-x", 2).await;
    let from_b = on_b.await.unwrap();
    assert_eq!(from_b.status, StatusCode::OK, "{}", from_b.body);
    assert_eq!(from_b.body["kind"], "delta", "{}", from_b.body);
    assert!(names(&from_b.body).contains(&x.name), "{}", from_b.body);
    // Both gateways settle on the same cursor for the same changes.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ca = peers(&http, &s.a_url, &y, Some(&c0), 0).await.body;
        let cb = peers(&http, &s.b_url, &y, Some(&c0), 0).await.body;
        if cursor_of(&ca) == cursor_of(&cb) {
            assert_eq!(names(&ca), names(&cb));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A at {} and B at {}",
            cursor_of(&ca),
            cursor_of(&cb)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // x joined through A and polls B straight away.
    let x_on_b = peers(&http, &s.b_url, &x, Some(&c0), 0).await;
    assert_eq!(x_on_b.status, StatusCode::OK, "{}", x_on_b.body);

    let b_status = status(&http, &s.b_url, &y).await;
    assert_eq!(b_status.body["snapshots_sent"], 0, "{}", b_status.body);
    assert_eq!(b_status.body["store"]["kind"], "etcd");
    assert_eq!(b_status.body["store"]["writable"], true);

    // A cursor ahead of B waits for B to reach it (the unit test
    // `a_cursor_ahead_of_the_view_waits_for_it_and_never_gets_a_snapshot` shows the delta);
    // one etcd never reached means the store went back: a snapshot (the unit test
    // `a_gateway_behind_its_store_sends_a_node_elsewhere_rather_than_roll_it_back` shows the
    // lagging case).
    let head = cursor_of(&peers(&http, &s.b_url, &y, Some(&c0), 0).await.body);
    let ahead = cursor_ahead(&head, 1_000_000);
    let waited = peers(&http, &s.b_url, &y, Some(&ahead), 1).await;
    assert_eq!(
        waited.body["kind"], "snapshot",
        "head {head} ahead {ahead}: {}",
        waited.body
    );
    assert_eq!(cursor_of(&waited.body), head, "B's own head");

    // Every update names both gateways, each its own first.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let on_a = peers(&http, &s.a_url, &y, Some(&c0), 0).await.body;
        let on_b = peers(&http, &s.b_url, &y, Some(&c0), 0).await.body;
        let (ga, gb) = (on_a["gateways"].clone(), on_b["gateways"].clone());
        if ga == serde_json::json!([s.a_url, s.b_url])
            && gb == serde_json::json!([s.b_url, s.a_url])
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateways: A says {ga}, B says {gb}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // `gateway status`: the members, writable, both gateways alive.
    let status = status_json(&s.a_config);
    assert_eq!(status["store"]["kind"], "etcd");
    assert_eq!(status["writable"], true, "{status}");
    assert_eq!(
        status["cluster"]["members"].as_array().unwrap().len(),
        3,
        "{status}"
    );
    let mut alive = alive_urls(&status);
    alive.sort();
    let mut both = vec![s.a_url.clone(), s.b_url.clone()];
    both.sort();
    assert_eq!(alive, both);
    let text = cli_ok(&s.a_config, &["gateway", "status"]);
    assert!(
        text.contains("gateways alive:") && text.contains(&s.b_url),
        "{text}"
    );

    // B dies without a word: its lease runs out and it leaves the list.
    b.kill();
    let killed = Instant::now();
    loop {
        if alive_urls(&status_json(&s.a_config)) == vec![s.a_url.clone()] {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10 + 3),
            "B still listed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let gone = killed.elapsed();
    eprintln!(
        "a SIGKILLed gateway left the list after {} ms (lease TTL 10 s)",
        gone.as_millis()
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let on_a = peers(&http, &s.a_url, &y, Some(&c0), 0).await.body;
        if on_a["gateways"] == serde_json::json!([s.a_url]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A still lists {}",
            on_a["gateways"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The admin commands work on etcd: nodes, revoke, and withdrawing B's signing rights.
    let nodes: Value =
        serde_json::from_str(&cli_ok(&s.a_config, &["gateway", "nodes", "--json"])).unwrap();
    let mut listed: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, ["gw-a", "gw-b", "node-x", "node-y"]);
    let x_id = x.session.split('.').next().unwrap().to_owned();
    let mut cursor = cursor_of(&peers(&http, &s.a_url, &y, Some(&c0), 0).await.body);
    cli_ok(&s.a_config, &["gateway", "revoke", "node-x"]);
    let revoked = cli_ok(&s.a_config, &["gateway", "signer", "revoke", "gw-b"]);
    assert!(revoked.contains("1 of its records re-signed"), "{revoked}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut x_revoked, mut b_resigned, mut b_cert) = (false, false, false);
    while !(x_revoked && b_resigned && b_cert) {
        assert!(
            Instant::now() < deadline,
            "revoked {x_revoked}, re-signed {b_resigned}, cert {b_cert}"
        );
        let update = peers(&http, &s.a_url, &y, Some(&cursor), 2).await.body;
        assert_eq!(update["kind"], "delta", "{update}");
        cursor = cursor_of(&update);
        let signers = update["signers"].as_array().unwrap();
        b_cert |= signers
            .iter()
            .any(|c| c["name"] == "gw-b" && c["serial"] == 2);
        x_revoked |= update["revocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["node_id"] == x_id.as_str());
        // Re-signed by A: a later serial, and no longer by gw-b's key.
        b_resigned |= update["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "gw-b" && r["serial"] == 2);
    }
    let list = cli_ok(&s.a_config, &["gateway", "signer", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("gw-b") && l.ends_with("revoked")),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_quorum_joins_get_503_with_the_reason_and_polls_keep_answering() {
    if EtcdCluster::missing() {
        return;
    }
    let mut cluster = EtcdCluster::start(3);
    let s = setup(&cluster);
    let _a = s.start_a().await;
    let http = https(&s.ca);
    let token = s.token();
    let y = join_ok(&http, &s.a_url, &token, "node-y", 1).await;
    let c0 = cursor_of(&peers(&http, &s.a_url, &y, None, 0).await.body);

    cluster.kill_quorum();
    let asked = Instant::now();
    let refused = join(&http, &s.a_url, &token, "node-z", 3).await;
    let took = asked.elapsed();
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    let error = refused.body["error"].as_str().unwrap();
    assert!(
        error.contains("quorum") && error.contains("nodes keep their peers"),
        "{error}"
    );
    assert_eq!(refused.body["retry"], true);
    assert!(
        matches!(refused.retry_after, Some(2..=5)),
        "{:?}",
        refused.retry_after
    );
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    // Polls are served from the view meanwhile.
    let poll = peers(&http, &s.a_url, &y, Some(&c0), 1).await;
    assert_eq!(poll.status, StatusCode::OK, "{}", poll.body);
    let status = status(&http, &s.a_url, &y).await;
    assert_eq!(status.body["store"]["writable"], false, "{}", status.body);
    assert!(
        status.body["store"]["reason"]
            .as_str()
            .unwrap()
            .contains("quorum")
    );
    // `gateway status` says so too (it cannot even open the store for reading).
    let report = status_json(&s.a_config);
    assert_eq!(report["writable"], false, "{report}");
    eprintln!("gateway status without quorum: {}", report["reason"]);

    // Quorum back: joins go through again, nothing restarted.
    cluster.restore_quorum();
    let back = Instant::now();
    loop {
        let answer = join(&http, &s.a_url, &token, "node-z", 3).await;
        if answer.status == StatusCode::OK {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "still refused: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "joins resumed {} ms after quorum returned",
        back.elapsed().as_millis()
    );
}
