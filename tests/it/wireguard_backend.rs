//! Backend choice and the kernel path's probe, against this machine's real kernel. Root only.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use crate::support::lab::{self, Lab};
use crate::support::{Node, last_status};

fn config(lab: &Lab, d: &std::path::Path, backend: &str, implementation: &str) -> String {
    format!(
        r#"
[node]
name = "solo"
state_dir = "{d}/state"
runtime_dir = "{d}/run"
[api]
socket = "{d}/run/clawnode.sock"
[network]
provider = "wireguard"
[network.wireguard]
interface = "{iface}"
backend = "{backend}"
userspace_implementation = "{implementation}"
mesh_cidr = "198.51.100.0/24"
address = "198.51.100.1/24"
mtu = 1380
[gpu]
enabled = false
"#,
        d = d.display(),
        iface = lab.iface(0),
    )
}

/// Does this kernel have WireGuard? Asked the way an operator would, in a scratch namespace.
fn kernel_has_wireguard(lab: &Lab) -> bool {
    let ok = lab
        .exec(0, &["ip", "link", "add", "cwprobe", "type", "wireguard"])
        .status
        .success();
    if ok {
        lab.exec(0, &["ip", "link", "del", "cwprobe"]);
    }
    ok
}

#[test]
fn auto_picks_what_the_kernel_offers_and_says_why() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let kernel = kernel_has_wireguard(&lab);
    let node = Node::start_in(
        Some(lab.ns(0)),
        |d| config(&lab, d, "auto", "wireguard-go"),
        &[],
    );
    let seen = node.recv_until("READY=1", Duration::from_secs(20));
    let expected = if kernel { "kernel" } else { "userspace" };
    let status = last_status(&seen);
    assert!(
        status.starts_with(&format!("ready: wireguard/{expected} {}", lab.iface(0))),
        "{status}"
    );
    let log = node.stderr();
    assert!(log.contains("chose WireGuard backend"), "{log}");
    if !kernel {
        assert!(log.contains("no WireGuard kernel module"), "{log}");
    }
    // The probe left nothing behind, and the link has the configured MTU.
    let links = String::from_utf8_lossy(&lab.exec(0, &["ip", "-o", "link"]).stdout).to_string();
    assert!(!links.contains("clawprobe0"), "{links}");
    assert!(links.contains("mtu 1380"), "{links}");
}

#[test]
fn no_kernel_module_and_no_userspace_program_names_both_fixes() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    if kernel_has_wireguard(&lab) {
        eprintln!("skipped: this kernel has WireGuard, so auto never needs userspace");
        return;
    }
    let node = Node::start_in(
        Some(lab.ns(0)),
        |d| config(&lab, d, "auto", "/nonexistent/wireguard-go"),
        &[],
    );
    let seen = node.drain(Duration::from_millis(1500));
    assert!(!support::has(&seen, "READY=1"));
    let status = last_status(&seen);
    assert!(status.contains("no WireGuard available"), "{status}");
    assert!(status.contains("modprobe wireguard"), "{status}");
    assert!(status.contains("wireguard-go"), "{status}");
}

#[test]
fn kernel_backend_without_the_module_says_how_to_fix_it() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    if kernel_has_wireguard(&lab) {
        eprintln!("skipped: this kernel has WireGuard");
        return;
    }
    let node = Node::start_in(
        Some(lab.ns(0)),
        |d| config(&lab, d, "kernel", "wireguard-go"),
        &[],
    );
    let seen = node.drain(Duration::from_millis(1500));
    let status = last_status(&seen);
    assert!(
        status.contains("this kernel has no WireGuard module"),
        "{status}"
    );
    assert!(status.contains("backend = \"userspace\""), "{status}");
}

#[test]
fn without_cap_net_admin_run_fails_with_one_clear_line() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to drop to an unprivileged user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("clawbernetes.toml");
    std::fs::write(
        &path,
        "[network.wireguard]\naddress = \"10.100.0.5/16\"\n[node]\nname = \"x\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            support::BIN,
            "run",
            "--config",
        ])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
}

#[test]
fn keep_interface_on_stop_leaves_the_tunnel_up_after_clawnode_exits() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let mut node = Node::start_in(
        Some(lab.ns(0)),
        |d| {
            config(&lab, d, "userspace", "wireguard-go")
                .replace("mtu = 1380", "mtu = 1380\nkeep_interface_on_stop = true")
        },
        &[],
    );
    node.recv_until("READY=1", Duration::from_secs(20));
    node.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(node.wait_exit(Duration::from_secs(6)).0.code(), Some(0));
    std::thread::sleep(Duration::from_millis(300));
    let link = lab.exec(0, &["ip", "-br", "addr", "show", "dev", &lab.iface(0)]);
    let text = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.status.success() && text.contains("198.51.100.1/24"),
        "{text}"
    );
    // Clean up the daemon that was left running on purpose.
    let _ = Command::new("pkill")
        .args(["-f", &format!("wireguard-go -f {}$", lab.iface(0))])
        .output();
}

#[test]
fn pubkey_prints_the_public_key_of_the_generated_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("state/wireguard.key");
    let path = dir.path().join("clawbernetes.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\nname = \"x\"\n[network.wireguard]\naddress = \"10.100.0.5/16\"\nprivate_key_file = \"{}\"\n",
            key.display()
        ),
    )
    .unwrap();
    let run = || {
        Command::new(support::BIN)
            .args(["pubkey", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(run().stdout, first.stdout, "the key is generated once");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    if let Ok(wg) = Command::new("sh")
        .arg("-c")
        .arg(format!("wg pubkey < {}", key.display()))
        .output()
        && wg.status.success()
    {
        assert_eq!(wg.stdout, first.stdout, "matches wg pubkey");
    }
}

#[test]
fn changing_the_address_on_reload_replaces_the_old_one() {
    if let Err(why) = lab::available() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(1);
    let node = Node::start_in(
        Some(lab.ns(0)),
        |d| config(&lab, d, "userspace", "wireguard-go"),
        &[],
    );
    node.recv_until("READY=1", Duration::from_secs(20));
    let text = std::fs::read_to_string(&node.config)
        .unwrap()
        .replace("198.51.100.1/24", "198.51.100.2/24");
    node.rewrite_config(&text);
    node.signal(nix::sys::signal::Signal::SIGHUP);
    node.recv_until("READY=1", Duration::from_secs(20));
    let out = lab.exec(0, &["ip", "-br", "addr", "show", "dev", &lab.iface(0)]);
    let addrs = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(addrs.contains("198.51.100.2/24"), "{addrs}");
    assert!(!addrs.contains("198.51.100.1/24"), "{addrs}");
}
