//! A lab of network namespaces: nodes joined by veth pairs to a bridge in a switch namespace,
//! on the TEST-NET-1 underlay 192.0.2.0/24 (node i is 192.0.2.(i+1)). Everything lives inside
//! these namespaces and is deleted on drop.
#![allow(dead_code)]

use std::fs::File;
use std::process::{Command, Output};

pub struct Lab {
    pub tag: String,
    pub nodes: Vec<String>,
    pub switch: String,
}

/// Root, iproute2 and wireguard-go are needed; tests skip themselves without them.
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root for network namespaces".into());
    }
    for tool in ["ip", "wireguard-go", "ping"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("needs {tool}"));
        }
    }
    Ok(())
}

/// A WireGuard private key file `<dir>/<name>.key` (made with `wg genkey`, 0600) and its
/// public key.
pub fn wg_key(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let path = dir.join(format!("{name}.key"));
    let out = sh(&format!(
        "umask 077; wg genkey > {p} && wg pubkey < {p}",
        p = path.display()
    ));
    (
        path,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

pub fn sh(script: &str) -> Output {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "`{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Lab {
    pub fn new(nodes: usize) -> Lab {
        // Short and unique per test process and call, so parallel tests never collide.
        let tag = format!("{:x}", (std::process::id() % 0xfff) * 16 + next_id());
        let switch = format!("cn{tag}s");
        let nodes: Vec<String> = (0..nodes).map(|i| format!("cn{tag}n{i}")).collect();
        sh(&format!(
            "ip netns add {switch} && ip -n {switch} link add br0 type bridge && ip -n {switch} link set br0 up && ip -n {switch} link set lo up"
        ));
        for (i, ns) in nodes.iter().enumerate() {
            sh(&format!(
                "ip netns add {ns} && ip -n {ns} link set lo up && \
                 ip link add u{tag}{i} netns {ns} type veth peer name p{tag}{i} netns {switch} && \
                 ip -n {switch} link set p{tag}{i} master br0 up && \
                 ip -n {ns} addr add 192.0.2.{}/24 dev u{tag}{i} && ip -n {ns} link set u{tag}{i} up",
                i + 1
            ));
        }
        Lab { tag, nodes, switch }
    }

    /// `clawnode services discover <service> --json --config <config>` inside namespace `i`.
    pub fn discover(&self, i: usize, config: &std::path::Path, service: &str) -> Output {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                self.ns(i),
                super::BIN,
                "services",
                "discover",
            ])
            .args([service, "--json", "--config"])
            .arg(config)
            .output()
            .expect("run clawnode services discover")
    }

    pub fn ns(&self, i: usize) -> &str {
        &self.nodes[i]
    }

    /// The WireGuard interface name for node i: unique machine-wide, because userspace UAPI
    /// sockets live in one directory shared by all namespaces.
    pub fn iface(&self, i: usize) -> String {
        format!("cw{}{}", self.tag, i)
    }

    pub fn underlay(&self, i: usize) -> String {
        format!("192.0.2.{}", i + 1)
    }

    pub fn exec(&self, i: usize, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", self.ns(i)])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// One ping from node `from` to `ip`, waiting at most `wait_s` seconds.
    pub fn ping(&self, from: usize, ip: &str, wait_s: u32) -> bool {
        self.exec(from, &["ping", "-c1", "-W", &wait_s.to_string(), ip])
            .status
            .success()
    }

    /// A file handle for the namespace, for `setns` in a helper thread.
    pub fn netns_file(&self, ns: &str) -> File {
        File::open(format!("/var/run/netns/{ns}")).expect("netns file")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("pkill")
            .args(["-f", &format!("wireguard-go -f cw{}", self.tag)])
            .output();
    }
}

fn next_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) % 16
}

/// Run `f` on a thread that has entered namespace `ns`; sockets it creates stay there.
pub fn in_netns<T: Send + 'static>(
    file: File,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}
