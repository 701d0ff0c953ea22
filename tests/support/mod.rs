//! Helpers for driving the real `clawnode` binary: a private directory per test, a config with
//! the fake mesh provider, and a Unix datagram socket bound as `NOTIFY_SOCKET` that captures
//! exactly what systemd would receive.
#![allow(dead_code)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub mod control;
pub mod etcd;
pub mod gateway;
pub mod lab;
pub mod nvml;
pub mod tailscaled;

pub const BIN: &str = env!("CARGO_BIN_EXE_clawnode");

/// A config for the fake mesh with `extra` appended (TOML tables that do not clash).
/// Nothing listens on molt-provider's port and no GPU is usable here, so its health check is
/// off and it needs no GPU: tests of something else see it advertised as before. Tests of
/// health checks write their own `[services]` (see tests/it/service_health.rs).
pub fn fake_config(dir: &Path, network_fake: &str, extra: &str) -> String {
    let d = dir.display();
    format!(
        r#"
[node]
name = "test-node"
state_dir = "{d}/state"
runtime_dir = "{d}/run"

[api]
socket = "{d}/run/clawnode.sock"

[network]
provider = "fake"

[network.fake]
address = "10.100.0.5/16"
{network_fake}

[gpu]
enabled = true
nvml_library = "{d}/no-such-dir/libnvidia-ml.so.1"

[services.molt-provider]
port = 8443
mode = "tcp"
requires_gpus = false
[services.molt-provider.check]
type = "none"
{extra}
"#
    )
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub notify: UnixDatagram,
    pub child: Option<Child>,
    pub started: Instant,
    /// How the last launch ran (`ip netns exec NS`, env), so `restart` starts it the same way.
    wrapper: Vec<String>,
    env: Vec<(String, String)>,
}

impl Node {
    /// Write `config_text` and start `clawnode run` on it.
    pub fn start(config_text: impl FnOnce(&Path) -> String, env: &[(&str, &str)]) -> Node {
        Node::start_in(None, config_text, env)
    }

    /// Start `clawnode run` inside network namespace `netns` (through `ip netns exec`, which
    /// execs, so the child's PID is clawnode's).
    pub fn start_in(
        netns: Option<&str>,
        config_text: impl FnOnce(&Path) -> String,
        env: &[(&str, &str)],
    ) -> Node {
        let mut node = Node::prepare(config_text);
        node.launch_in(netns, env);
        node
    }

    /// Start `clawnode run` through `wrapper` (a command that execs its arguments, such as
    /// `ip netns exec NS` or `setpriv …`, so the child's PID is clawnode's).
    pub fn start_wrapped(
        wrapper: &[&str],
        config_text: impl FnOnce(&Path) -> String,
        env: &[(&str, &str)],
    ) -> Node {
        let mut node = Node::prepare(config_text);
        node.launch_wrapped(wrapper, env);
        node
    }

    /// A private directory with `config_text` written and the notify socket bound, nothing
    /// started yet: for set-up commands that must run first (`clawnode gateway init`).
    pub fn prepare(config_text: impl FnOnce(&Path) -> String) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("clawbernetes.toml");
        std::fs::write(&config, config_text(dir.path())).expect("write config");
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
        Node {
            dir,
            config,
            notify,
            child: None,
            started: Instant::now(),
            wrapper: Vec::new(),
            env: Vec::new(),
        }
    }

    /// `launch_wrapped` inside network namespace `netns`, or directly.
    pub fn launch_in(&mut self, netns: Option<&str>, env: &[(&str, &str)]) {
        match netns {
            Some(ns) => self.launch_wrapped(&["ip", "netns", "exec", ns], env),
            None => self.launch_wrapped(&[], env),
        }
    }

    /// Start `clawnode run` on this node's config through `wrapper`; stderr is appended to
    /// `stderr.log`, so a restarted daemon's log follows the previous one.
    pub fn launch_wrapped(&mut self, wrapper: &[&str], env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "clawnode already runs");
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    /// Start `clawnode run` again the way it was last started (after it exited or was killed).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "clawnode still runs");
        self.spawn();
    }

    /// SIGKILL, then reap: nothing is torn down, as when the machine loses power.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM and wait for a clean exit (status 0).
    pub fn stop(&mut self, timeout: Duration) {
        self.signal(Signal::SIGTERM);
        let (status, _) = self.wait_exit(timeout);
        assert!(status.success(), "exit {status:?}\n{}", self.stderr());
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stderr.log"))
            .expect("log file");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("INVOCATION_ID")
            .env_remove("JOURNAL_STREAM")
            .env("NOTIFY_SOCKET", self.dir.path().join("notify.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.started = Instant::now();
        self.child = Some(cmd.spawn().expect("spawn clawnode"));
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("kill");
    }

    /// The next datagram, as its `KEY=value` lines.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<String>> {
        self.notify
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        let mut buf = vec![0u8; 8192];
        // A receive with a timeout can fail with EINTR when the process is stopped and
        // continued, with no handler involved (signal(7)); that is not the end of the wait.
        let n = loop {
            match self.notify.recv(&mut buf) {
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                result => break result.ok()?,
            }
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        Some(text.lines().map(str::to_string).collect())
    }

    /// Read datagrams until one has a line starting with `prefix`; returns every datagram read,
    /// the matching one last. Panics after `timeout`, showing what did arrive.
    pub fn recv_until(&self, prefix: &str, timeout: Duration) -> Vec<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(datagram) = self.recv(left) else {
                break;
            };
            let hit = datagram.iter().any(|l| l.starts_with(prefix));
            seen.push(datagram);
            if hit {
                return seen;
            }
        }
        panic!(
            "no {prefix} within {timeout:?}; got {seen:?}\nstderr:\n{}",
            self.stderr()
        );
    }

    /// Every datagram that arrives within `window`.
    pub fn drain(&self, window: Duration) -> Vec<Vec<String>> {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(d) => seen.push(d),
                None => break,
            }
        }
        seen
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.path("stderr.log")).unwrap_or_default()
    }

    /// Run another clawnode subcommand against this node's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("NOTIFY_SOCKET")
            .output()
            .expect("run clawnode")
    }

    pub fn status_json(&self) -> serde_json::Value {
        // --socket, because a test may have just made the config file invalid on purpose.
        let socket = self.path("run/clawnode.sock");
        let out = self.cli(&["status", "--json", "--socket", socket.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "status --json failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    pub fn rewrite_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("rewrite config");
    }

    /// Wait for the daemon to exit and return its status and how long it took.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let since = Instant::now();
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return (status, since.elapsed());
            }
            if since.elapsed() > timeout {
                panic!("clawnode did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Gracefully first, so a real provider tears down what it set up.
        if let Some(child) = &mut self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(6);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP port on loopback that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `done` until it holds; fails after `timeout` with `what` and the node's log.
pub fn wait_until(timeout: Duration, what: &str, node: &Node, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            node.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fails the test with the command's stderr unless it exited 0.
pub fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// True if any line of any datagram starts with `prefix`.
pub fn has(datagrams: &[Vec<String>], prefix: &str) -> bool {
    datagrams.iter().flatten().any(|l| l.starts_with(prefix))
}

/// The value of the last `STATUS=` line.
pub fn last_status(datagrams: &[Vec<String>]) -> String {
    datagrams
        .iter()
        .flatten()
        .filter_map(|l| l.strip_prefix("STATUS="))
        .next_back()
        .unwrap_or_default()
        .to_string()
}

/// CLOCK_MONOTONIC now, in microseconds, to check MONOTONIC_USEC against.
pub fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1000
}

/// A process's resident set size, from /proc, in kB.
pub fn rss_kb(pid: i32) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// How many descriptors a process has open.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc fd")
        .count()
}

/// `promtool check metrics` on `text`: its exit code and what it printed, or `None` (said on
/// stderr) when promtool is not installed (tests/run-all.sh installs it).
pub fn promtool_check(text: &str) -> Option<(Option<i32>, String)> {
    use std::io::Write;
    let installed = Command::new("sh")
        .args(["-c", "command -v promtool"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("promtool not installed: exposition not linted (tests/run-all.sh installs it)");
        return None;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool's output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.code(), report))
}
