//! A real etcd cluster (Debian's `/usr/bin/etcd`, 3.4) for the tests: n members on free
//! ports, data in a private directory (in /dev/shm when it exists: etcd fsyncs every write),
//! killed on drop. `start_on` runs the members inside a network namespace, e.g. a lab's switch
//! namespace once its bridge has an address, so gateways in other namespaces reach them.
//!
//! Skipping: `EtcdCluster::missing()` is true only when `/usr/bin/etcd` is absent and
//! `CLAWNODE_REQUIRE_ETCD` is unset; with it set (tests/run-all.sh) an absent etcd fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    host_ip: String,
    netns: Option<String>,
    initial_cluster: String,
    token: String,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Whether a test needing etcd should skip (and say so): etcd is not installed and the
    /// test run does not require it.
    pub fn missing() -> bool {
        if Path::new(ETCD).exists() {
            return false;
        }
        assert!(
            std::env::var_os("CLAWNODE_REQUIRE_ETCD").is_none(),
            "{ETCD} is missing but CLAWNODE_REQUIRE_ETCD is set: apt-get install etcd-server etcd-client"
        );
        eprintln!("skipped: {ETCD} is not installed (apt-get install etcd-server etcd-client)");
        true
    }

    /// An n-member cluster on loopback, healthy when this returns.
    pub fn start(n: usize) -> Self {
        Self::start_on(n, "127.0.0.1", None)
    }

    /// An n-member cluster listening on `host_ip`, run inside `netns` when given (the
    /// address must be configured there).
    pub fn start_on(n: usize, host_ip: &str, netns: Option<&str>) -> Self {
        assert!(n >= 1);
        let dir = match Path::new("/dev/shm").is_dir() {
            true => tempfile::Builder::new()
                .prefix("clawnode-etcd")
                .tempdir_in("/dev/shm"),
            false => tempfile::Builder::new().prefix("clawnode-etcd").tempdir(),
        }
        .expect("etcd data dir");
        let ports = free_ports(host_ip, netns, 2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{host_ip}:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "clawnode-test-{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let mut cluster = EtcdCluster {
            dir,
            host_ip: host_ip.to_owned(),
            netns: netns.map(str::to_owned),
            initial_cluster,
            token,
            members,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    /// The client URLs (`http://ip:port`), member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}:{}", self.host_ip, self.members[i].client_port)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// SIGKILL member i (its data stays for `restart`).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Start member i again on its data; returns once it answers health (the cluster has a
    /// leader).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        let endpoint = self.endpoint(i);
        self.wait_until(Duration::from_secs(30), &[endpoint]);
    }

    /// The members `kill_quorum` kills: all but the first `(n-1)/2`, leaving fewer than a
    /// majority alive (member 0 stays up for n ≥ 2).
    fn quorum_victims(&self) -> std::ops::Range<usize> {
        let n = self.members.len();
        let alive_max = (n - 1) / 2;
        alive_max.max(1).min(n - 1)..n
    }

    /// SIGKILL enough members that no majority is left.
    pub fn kill_quorum(&mut self) {
        for i in self.quorum_victims() {
            self.kill(i);
        }
    }

    /// Restart every killed member; returns once all answer health.
    pub fn restore_quorum(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
        self.wait_healthy(Duration::from_secs(30));
    }

    /// `etcdctl` with these endpoints (and namespace), for a test to inspect the cluster.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let endpoints = self.endpoints().join(",");
        let mut command = self.command(ETCDCTL);
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .args(args);
        command.output().expect("run etcdctl")
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, program]);
                command
            }
            None => Command::new(program),
        }
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                self.dir
                    .path()
                    .join(format!("{}.log", self.members[i].name)),
            )
            .expect("etcd log file");
        let m = &self.members[i];
        let ip = &self.host_ip;
        let client = format!("http://{ip}:{}", m.client_port);
        let peer = format!("http://{ip}:{}", m.peer_port);
        let mut command = self.command(ETCD);
        command
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", self.data_dir(i).display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let child = command.spawn().expect("start etcd");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self, limit: Duration) {
        let alive: Vec<String> = (0..self.members.len())
            .filter(|i| self.members[*i].child.is_some())
            .map(|i| self.endpoint(i))
            .collect();
        self.wait_until(limit, &alive);
    }

    /// Until every endpoint in `endpoints` answers `endpoint health` (which needs a leader).
    fn wait_until(&self, limit: Duration, endpoints: &[String]) {
        let started = Instant::now();
        loop {
            let out = {
                let mut command = self.command(ETCDCTL);
                command
                    .env("ETCDCTL_API", "3")
                    .arg(format!("--endpoints={}", endpoints.join(",")))
                    .args(["endpoint", "health", "--command-timeout=2s"]);
                command.output().expect("run etcdctl")
            };
            if out.status.success() {
                return;
            }
            if started.elapsed() > limit {
                panic!(
                    "etcd not healthy after {limit:?}: {}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The members' logs, for a failure message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let text = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {} ---\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// `count` distinct ports nothing listens on. On the host: bound and released by the kernel's
/// choice. In a namespace (empty but for our processes): random high ports.
fn free_ports(host_ip: &str, netns: Option<&str>, count: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(count);
    let mut held = Vec::new();
    while ports.len() < count {
        let port = match netns {
            None => {
                let listener = std::net::TcpListener::bind((host_ip, 0)).expect("bind a free port");
                let port = listener.local_addr().expect("local addr").port();
                held.push(listener);
                port
            }
            Some(_) => 20_000 + fastrand::u16(..40_000),
        };
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}
