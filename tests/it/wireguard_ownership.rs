//! Interfaces clawnode does not own, stops during a join, and reloads that change the interface
//! or the backend, through the real binary in network namespaces (userspace backend, Debian's
//! wireguard-go). Root only; skipped otherwise.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support;

use crate::support::lab::{self, Lab};
use crate::support::{Node, wait_until};

const WAIT: Duration = Duration::from_secs(20);

fn mesh_ip(i: usize) -> String {
    format!("198.51.100.{}", i + 1)
}

/// A private key file and its public key, made with `wg`.
fn key(dir: &Path, name: &str) -> (PathBuf, String) {
    lab::wg_key(dir, name)
}

fn config(d: &Path, iface: &str, i: usize, extra: &str, peers: &str) -> String {
    std::fs::create_dir_all(d.join("peers.d")).unwrap();
    format!(
        r#"
[node]
name = "node-{i}"
state_dir = "{d}/state"
runtime_dir = "{d}/run"
[api]
socket = "{d}/run/clawnode.sock"
[network]
provider = "wireguard"
[network.wireguard]
interface = "{iface}"
backend = "userspace"
listen_port = 51820
mesh_cidr = "198.51.100.0/24"
address = "{ip}/24"
peers_dir = "{d}/peers.d"
reconcile_interval = "1s"
{extra}
{peers}
[gpu]
enabled = false
"#,
        d = d.display(),
        ip = mesh_ip(i),
    )
}

fn peer(lab: &Lab, j: usize, public: &str) -> String {
    format!(
        "[[network.wireguard.peers]]\nname = \"node-{j}\"\npublic_key = \"{public}\"\nendpoint = \"{}:51820\"\nallowed_ips = [\"{}/32\"]\n",
        lab.underlay(j),
        mesh_ip(j)
    )
}

/// Everything an operator would compare: the link with its details, its addresses, and for a
/// WireGuard interface its whole configuration. Bridge timers tick; they are left out.
fn snapshot(lab: &Lab, iface: &str, wireguard: bool) -> String {
    let run = |args: &[&str]| String::from_utf8_lossy(&lab.exec(0, args).stdout).to_string();
    let link = run(&["ip", "-d", "link", "show", "dev", iface]);
    let link: Vec<&str> = link
        .split_whitespace()
        .scan(false, |skip_next, word| {
            let skip = std::mem::replace(skip_next, word.ends_with("_timer"));
            Some((!skip && !word.ends_with("_timer")).then_some(word))
        })
        .flatten()
        .collect();
    let mut out = format!(
        "{}\n{}",
        link.join(" "),
        run(&["ip", "addr", "show", "dev", iface])
    );
    if wireguard {
        out.push_str(&run(&["wg", "showconf", iface]));
    }
    out
}

/// `clawnode doctor` run inside node 0's namespace, as the operator would before a start.
fn doctor(lab: &Lab, config: &Path) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.ns(0),
            support::BIN,
            "doctor",
            "--config",
        ])
        .arg(config)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn wireguard_go_pid(iface: &str) -> Option<i32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("wireguard-go -f {iface}$")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn link_exists(lab: &Lab, iface: &str) -> bool {
    lab.exec(0, &["ip", "link", "show", "dev", iface])
        .status
        .success()
}

/// The mesh component's error once it has one.
fn wait_for_mesh_error(node: &Node) -> serde_json::Value {
    let mut doc = serde_json::Value::Null;
    wait_until(WAIT, "a mesh error in status", node, || {
        if !node.path("run/clawnode.sock").exists() {
            return false;
        }
        doc = node.status_json();
        doc["mesh"]["error"].is_string()
    });
    doc
}

fn stop(node: &mut Node) {
    node.signal(Signal::SIGTERM);
    let (status, _) = node.wait_exit(Duration::from_secs(6));
    assert_eq!(status.code(), Some(0), "{}", node.stderr());
}

/// A WireGuard interface someone else runs (wg-quick style, with wireguard-go): its own key,
/// port, peer and address.
struct Foreign {
    daemon: Child,
}

impl Foreign {
    fn start(lab: &Lab, iface: &str, dir: &Path) -> Foreign {
        let daemon = Command::new("ip")
            .args(["netns", "exec", lab.ns(0), "wireguard-go", "-f", iface])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let socket = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        let socket_run = PathBuf::from(format!("/run/wireguard/{iface}.sock"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() && !socket_run.exists() {
            assert!(Instant::now() < deadline, "wireguard-go made no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (own_key, _) = key(dir, "foreign");
        let (_, their_peer) = key(dir, "foreign-peer");
        lab::sh(&format!(
            "ip netns exec {ns} wg set {iface} private-key {k} listen-port 51999 peer {their_peer} allowed-ips 198.51.100.77/32 && \
             ip -n {ns} addr add 198.51.100.50/24 dev {iface} && ip -n {ns} link set {iface} up",
            ns = lab.ns(0),
            k = own_key.display(),
        ));
        Foreign { daemon }
    }

    fn alive(&mut self) -> bool {
        self.daemon.try_wait().unwrap().is_none()
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

#[test]
fn an_existing_bridge_with_the_interface_name_is_left_untouched_and_reported() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let iface = lab.iface(0);
    lab::sh(&format!(
        "ip -n {ns} link add {iface} type bridge && ip -n {ns} addr add 203.0.113.1/24 dev {iface} && ip -n {ns} link set {iface} up",
        ns = lab.ns(0)
    ));
    let before = snapshot(&lab, &iface, false);
    let mut node = Node::start_in(Some(lab.ns(0)), |d| config(d, &iface, 0, "", ""), &[]);
    let doc = wait_for_mesh_error(&node);
    let error = doc["mesh"]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "interface {iface} already exists and is not WireGuard (a bridge link)"
        )),
        "{error}"
    );
    assert_eq!(doc["mesh"]["waiting_for_operator"], true, "{doc}");
    assert_eq!(doc["ready"], false);
    assert!(
        node.stderr().contains("is not WireGuard"),
        "{}",
        node.stderr()
    );
    assert_eq!(
        snapshot(&lab, &iface, false),
        before,
        "untouched while running"
    );
    stop(&mut node);
    assert_eq!(
        snapshot(&lab, &iface, false),
        before,
        "untouched after stop"
    );
    assert_eq!(wireguard_go_pid(&iface), None);
    let text = doctor(&lab, &node.config);
    assert!(
        text.contains(&format!(
            "[FAIL] interface: {iface} exists and is not WireGuard (a bridge link)"
        )),
        "{text}"
    );
}

#[test]
fn an_existing_wireguard_interface_is_left_untouched_unless_adopting_is_set() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let iface = lab.iface(0);
    let keys = tempfile::tempdir().unwrap();
    let mut foreign = Foreign::start(&lab, &iface, keys.path());
    let before = snapshot(&lab, &iface, true);
    assert!(before.contains("ListenPort = 51999"), "{before}");

    let mut node = Node::start_in(Some(lab.ns(0)), |d| config(d, &iface, 0, "", ""), &[]);
    let doc = wait_for_mesh_error(&node);
    let error = doc["mesh"]["error"].as_str().unwrap();
    assert!(
        error.contains("existing userspace WireGuard interface that clawnode did not create")
            && error.contains("adopt_existing_interface = true"),
        "{error}"
    );
    assert_eq!(doc["mesh"]["waiting_for_operator"], true, "{doc}");
    assert!(
        node.stderr().contains("adopt_existing_interface"),
        "{}",
        node.stderr()
    );
    // A reconcile tick and a retry later, still untouched.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        snapshot(&lab, &iface, true),
        before,
        "untouched while running"
    );
    stop(&mut node);
    assert_eq!(snapshot(&lab, &iface, true), before, "untouched after stop");
    assert!(foreign.alive(), "the other wireguard-go still runs");
    let text = doctor(&lab, &node.config);
    assert!(
        text.contains(&format!(
            "[FAIL] interface: {iface} is a WireGuard interface clawnode did not create"
        )),
        "{text}"
    );

    // With adopt_existing_interface, clawnode takes it over: its key, address and peers.
    let (private, public) = key(keys.path(), "clawnode");
    let (_, peer_key) = key(keys.path(), "peer");
    let peers = peer(&lab, 1, &peer_key);
    let mut node = Node::start_in(
        Some(lab.ns(0)),
        |d| {
            config(
                d,
                &iface,
                0,
                &format!(
                    "adopt_existing_interface = true\nprivate_key_file = \"{}\"",
                    private.display()
                ),
                &peers,
            )
        },
        &[],
    );
    node.recv_until("READY=1", WAIT);
    let show = |what: &str| {
        String::from_utf8_lossy(&lab.exec(0, &["wg", "show", &iface, what]).stdout)
            .trim()
            .to_string()
    };
    assert_eq!(show("public-key"), public);
    assert_eq!(show("listen-port"), "51820");
    assert_eq!(show("peers"), peer_key);
    let addrs = String::from_utf8_lossy(
        &lab.exec(0, &["ip", "-br", "addr", "show", "dev", &iface])
            .stdout,
    )
    .to_string();
    assert!(
        addrs.contains("198.51.100.1/24") && !addrs.contains("198.51.100.50"),
        "{addrs}"
    );
    assert!(
        node.stderr()
            .contains("adopting an existing WireGuard interface")
    );
    // Adopted, not created: left in place on stop, its daemon still running.
    stop(&mut node);
    assert!(link_exists(&lab, &iface), "the adopted interface stays");
    assert!(foreign.alive(), "the other wireguard-go still runs");
}

/// A userspace implementation that takes its time: sleeps, then runs wireguard-go. Its stderr
/// goes elsewhere, so an orphaned one does not die of a closed pipe once clawnode has exited.
fn slow_wireguard_go(dir: &Path, seconds: f32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("slow-wireguard-go");
    std::fs::write(
        &path,
        format!("#!/bin/sh\nsleep {seconds}\nexec wireguard-go \"$@\" 2>/dev/null\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn stopping_during_a_slow_join_leaves_no_interface_and_no_wireguard_go() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let iface = lab.iface(0);
    let mut node = Node::start_in(
        Some(lab.ns(0)),
        |d| {
            let program = slow_wireguard_go(d, 2.0);
            config(
                d,
                &iface,
                0,
                &format!("userspace_implementation = \"{}\"", program.display()),
                "",
            )
        },
        &[],
    );
    wait_until(WAIT, "the slow daemon started", &node, || {
        node.stderr().contains("started userspace WireGuard")
    });
    stop(&mut node);
    // Past the wrapper's sleep: an orphaned wrapper would have started wireguard-go by now.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!link_exists(&lab, &iface), "no interface left behind");
    assert_eq!(
        wireguard_go_pid(&iface),
        None,
        "no wireguard-go left behind"
    );
    let wrapper = Command::new("pgrep")
        .args(["-f", &node.path("slow-wireguard-go").display().to_string()])
        .output()
        .unwrap();
    assert!(wrapper.stdout.is_empty(), "no wrapper left behind");
}

/// GET /v1/health/ready over the API socket, as systemd's or an orchestrator's probe would.
fn ready_code(socket: &Path) -> Option<u16> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /v1/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    reply.split_whitespace().nth(1)?.parse().ok()
}

/// Polls readiness until dropped; counts answers other than 200.
struct ReadyWatch {
    stop: Arc<AtomicBool>,
    polls: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Vec<Option<u16>>>>,
}

impl ReadyWatch {
    fn start(socket: PathBuf) -> ReadyWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(AtomicUsize::new(0));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&polls));
        let thread = std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let code = ready_code(&socket);
                if code != Some(200) {
                    bad.push(code);
                }
                p.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            bad
        });
        ReadyWatch {
            stop,
            polls,
            thread: Some(thread),
        }
    }

    /// The answers that were not 200, and how many polls there were.
    fn finish(mut self) -> (Vec<Option<u16>>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let bad = self.thread.take().unwrap().join().unwrap();
        (bad, self.polls.load(Ordering::Relaxed))
    }
}

fn time_to_reach(lab: &Lab, from: usize, ip: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if lab
            .exec(from, &["ping", "-c1", "-W", "0.2", ip])
            .status
            .success()
        {
            return Some(start.elapsed());
        }
    }
    None
}

#[test]
fn renaming_the_interface_on_reload_moves_the_mesh_and_removes_the_old_one() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(2);
    let keys = tempfile::tempdir().unwrap();
    let k: Vec<(PathBuf, String)> = (0..2).map(|i| key(keys.path(), &format!("n{i}"))).collect();
    let nodes: Vec<Node> = (0..2)
        .map(|i| {
            let j = 1 - i;
            Node::start_in(
                Some(lab.ns(i)),
                |d| {
                    config(
                        d,
                        &lab.iface(i),
                        i,
                        &format!("private_key_file = \"{}\"", k[i].0.display()),
                        &peer(&lab, j, &k[j].1),
                    )
                },
                &[],
            )
        })
        .collect();
    for node in &nodes {
        node.recv_until("READY=1", WAIT);
    }
    assert!(lab.ping(0, &mesh_ip(1), 5));
    let old = lab.iface(0);
    let old_daemon = wireguard_go_pid(&old).expect("wireguard-go runs");
    let new = lab.iface(5);

    let watch = ReadyWatch::start(nodes[0].path("run/clawnode.sock"));
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&nodes[0].config).unwrap().replace(
        &format!("interface = \"{old}\""),
        &format!("interface = \"{new}\""),
    );
    nodes[0].rewrite_config(&text);
    let reloaded = Instant::now();
    nodes[0].signal(Signal::SIGHUP);
    nodes[0].recv_until("READY=1", WAIT);
    time_to_reach(&lab, 0, &mesh_ip(1), Duration::from_secs(10))
        .expect("node 1 reachable through the renamed interface");
    println!(
        "rename: node 1 reachable through {new} {:.0} ms after SIGHUP",
        reloaded.elapsed().as_secs_f64() * 1000.0
    );
    std::thread::sleep(Duration::from_millis(300));
    let (bad, polls) = watch.finish();
    assert!(polls > 20, "polled {polls} times");
    assert!(bad.is_empty(), "/v1/health/ready was not 200: {bad:?}");

    assert!(!link_exists(&lab, &old), "the old interface is gone");
    assert_eq!(wireguard_go_pid(&old), None, "its wireguard-go is gone");
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_daemon), None).is_err(),
        "the old daemon exited"
    );
    assert!(wireguard_go_pid(&new).is_some());
    let peers = lab.exec(0, &["wg", "show", &new, "peers"]);
    assert_eq!(String::from_utf8_lossy(&peers.stdout).trim(), k[1].1);
    let doc = nodes[0].status_json();
    assert_eq!(doc["mesh"]["interface"], new.as_str(), "{doc}");
    assert_eq!(doc["ready"], true);
}

#[test]
fn changing_the_backend_on_reload_is_applied_or_reported() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let iface = lab.iface(0);
    let node = Node::start_in(Some(lab.ns(0)), |d| config(d, &iface, 0, "", ""), &[]);
    node.recv_until("READY=1", WAIT);
    let daemon = wireguard_go_pid(&iface).expect("wireguard-go runs");
    let index = |lab: &Lab| {
        String::from_utf8_lossy(
            &lab.exec(0, &["cat", &format!("/sys/class/net/{iface}/ifindex")])
                .stdout,
        )
        .trim()
        .to_string()
    };
    let first_index = index(&lab);
    let kernel = lab
        .exec(0, &["ip", "link", "add", "cwprobe", "type", "wireguard"])
        .status
        .success();
    if kernel {
        lab.exec(0, &["ip", "link", "del", "cwprobe"]);
    }
    let reload = |from: &str, to: &str| {
        let text = std::fs::read_to_string(&node.config).unwrap().replace(
            &format!("backend = \"{from}\""),
            &format!("backend = \"{to}\""),
        );
        node.rewrite_config(&text);
        node.signal(Signal::SIGHUP);
    };

    // auto chooses again; here that can only be userspace, so nothing changes.
    let watch = ReadyWatch::start(node.path("run/clawnode.sock"));
    reload("userspace", "auto");
    node.recv_until("READY=1", WAIT);
    std::thread::sleep(Duration::from_millis(500));
    let (bad, _) = watch.finish();
    assert_eq!(
        node.stderr().matches("chose WireGuard backend").count(),
        2,
        "{}",
        node.stderr()
    );
    if !kernel {
        assert!(bad.is_empty(), "/v1/health/ready was not 200: {bad:?}");
        assert_eq!(wireguard_go_pid(&iface), Some(daemon), "the same daemon");
        assert_eq!(index(&lab), first_index, "the same interface");
    }

    // kernel: applied where the module exists; without it, reported, and the interface in use
    // is kept until the operator says otherwise.
    reload("auto", "kernel");
    if kernel {
        node.recv_until("READY=1", WAIT);
        let link =
            String::from_utf8_lossy(&lab.exec(0, &["ip", "-d", "link", "show", &iface]).stdout)
                .to_string();
        assert!(link.contains("wireguard"), "{link}");
        assert_eq!(wireguard_go_pid(&iface), None);
        return;
    }
    let doc = wait_for_mesh_error(&node);
    let error = doc["mesh"]["error"].as_str().unwrap();
    assert!(
        error.contains("this kernel has no WireGuard module"),
        "{error}"
    );
    assert_eq!(doc["mesh"]["waiting_for_operator"], true, "{doc}");
    assert_eq!(
        wireguard_go_pid(&iface),
        Some(daemon),
        "the userspace interface is kept"
    );

    // READY=1 ends the reload; the mesh it restarts comes up just after.
    reload("kernel", "userspace");
    node.recv_until("READY=1", WAIT);
    wait_until(WAIT, "ready again", &node, || {
        node.status_json()["ready"] == true
    });
    assert_eq!(wireguard_go_pid(&iface), Some(daemon));
}

/// The record in state_dir: an interface kept on stop is clawnode's again after a restart, and
/// that later run removes it on its own stop.
#[test]
fn an_interface_kept_on_stop_is_recognised_as_clawnodes_after_a_restart() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let iface = lab.iface(0);
    let state = tempfile::tempdir().unwrap();
    let with_state = |d: &Path, extra: &str| {
        config(d, &iface, 0, extra, "").replace(
            &format!("state_dir = \"{}/state\"", d.display()),
            &format!("state_dir = \"{}\"", state.path().display()),
        )
    };
    let mut first = Node::start_in(
        Some(lab.ns(0)),
        |d| with_state(d, "keep_interface_on_stop = true"),
        &[],
    );
    first.recv_until("READY=1", WAIT);
    stop(&mut first);
    assert!(link_exists(&lab, &iface), "kept on stop");
    assert!(wireguard_go_pid(&iface).is_some(), "its daemon kept too");
    let text = doctor(&lab, &first.config);
    assert!(
        text.contains(&format!(
            "[ ok ] interface: {iface} exists and clawnode created it"
        )),
        "{text}"
    );

    let mut second = Node::start_in(Some(lab.ns(0)), |d| with_state(d, ""), &[]);
    second.recv_until("READY=1", WAIT);
    assert_eq!(second.status_json()["ready"], true);
    assert!(
        !second.stderr().contains("did not create"),
        "{}",
        second.stderr()
    );
    stop(&mut second);
    assert!(
        !link_exists(&lab, &iface),
        "removed by the later run's stop"
    );
    assert_eq!(wireguard_go_pid(&iface), None);
}

#[test]
fn renaming_to_a_name_clawnode_does_not_own_keeps_the_interface_in_use() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let (old, taken) = (lab.iface(0), lab.iface(5));
    lab::sh(&format!(
        "ip -n {ns} link add {taken} type bridge && ip -n {ns} addr add 203.0.113.1/24 dev {taken}",
        ns = lab.ns(0)
    ));
    let before = snapshot(&lab, &taken, false);
    let node = Node::start_in(Some(lab.ns(0)), |d| config(d, &old, 0, "", ""), &[]);
    node.recv_until("READY=1", WAIT);
    let daemon = wireguard_go_pid(&old).expect("wireguard-go runs");
    let text = std::fs::read_to_string(&node.config).unwrap().replace(
        &format!("interface = \"{old}\""),
        &format!("interface = \"{taken}\""),
    );
    node.rewrite_config(&text);
    node.signal(Signal::SIGHUP);
    let doc = wait_for_mesh_error(&node);
    let error = doc["mesh"]["error"].as_str().unwrap();
    assert!(
        error.contains("is not WireGuard (a bridge link)"),
        "{error}"
    );
    assert_eq!(
        snapshot(&lab, &taken, false),
        before,
        "the bridge is untouched"
    );
    assert_eq!(
        wireguard_go_pid(&old),
        Some(daemon),
        "the interface in use is kept"
    );
    assert!(link_exists(&lab, &old));
}
