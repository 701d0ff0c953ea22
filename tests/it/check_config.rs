//! `clawnode check-config` against the real binary: valid files pass with exit 0, and every
//! malformed file exits 78 with `file:line:col: key: reason` and no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_clawnode");
const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/clawbernetes.toml");
const EX_CONFIG: i32 = 78;

/// The block users already have, exactly as they wrote it.
const USERS_BLOCK: &str = include_str!("../fixtures/config/users-block.toml");

/// A malformed config and where its error must be reported.
struct Case {
    name: &'static str,
    toml: &'static str,
    line: usize,
    col: usize,
    key: &'static str,
    reason: &'static str,
}

const fn case(
    name: &'static str,
    toml: &'static str,
    line: usize,
    col: usize,
    key: &'static str,
    reason: &'static str,
) -> Case {
    Case {
        name,
        toml,
        line,
        col,
        key,
        reason,
    }
}

// One case per row: name, file, line, column, key path, reason.
#[rustfmt::skip]
const MALFORMED: &[Case] = &[
    // Wrong types.
    case(
        "port_given_as_string",
        "[network.wireguard]\nlisten_port = \"51820\"\n",
        2, 15, "network.wireguard.listen_port", "expected an integer",
    ),
    case(
        "boolean_given_as_string",
        "[gpu]\nenabled = \"yes\"\n",
        2, 11, "gpu.enabled", "expected a boolean",
    ),
    case(
        "table_given_as_string",
        "network = \"tailscale\"\n",
        1, 11, "network", "expected a table",
    ),
    case(
        "tags_given_as_string",
        "[network.tailscale]\ntags = \"tag:gpu\"\n",
        2, 8, "network.tailscale.tags", "expected an array",
    ),
    case(
        "tag_given_as_number",
        "[network.tailscale]\ntags = [\"tag:a\", 7]\n",
        2, 18, "network.tailscale.tags[1]", "expected a string",
    ),
    case(
        "integer_too_large",
        "[network.wireguard]\nfwmark = 99999999999999999999\n",
        2, 10, "network.wireguard.fwmark", "out of range",
    ),
    case(
        "tailscale_hostname_longer_than_a_dns_label",
        "[node]\nname = \"gpu-node-with-a-really-long-name-for-the-rack-0001\"\n[network]\nprovider = \"tailscale\"\n[network.tailscale]\nhostname_prefix = \"clawbernetes-provider\"\n",
        6, 19, "network.tailscale.hostname_prefix", "would be 72 characters, and a DNS label has at most 63",
    ),
    case(
        "tls_cert_outside_tailscale",
        "[network.wireguard]\naddress = \"10.100.0.5/16\"\n[services.web]\nport = 8080\nmode = \"http\"\ntls_cert = true\n",
        6, 12, "services.web.tls_cert", "expected no tls_cert unless network.provider = \"tailscale\"",
    ),
    // Unknown keys at several levels.
    case(
        "unknown_top_level_table",
        "[nodes]\nname = \"gpu-01\"\n",
        1, 2, "nodes", "unknown key `nodes`, expected one of `node`",
    ),
    case(
        "unknown_key_in_wireguard",
        "[network.wireguard]\nlisten-port = 51820\n",
        2, 1, "network.wireguard.listen-port", "expected one of `interface`",
    ),
    case(
        "unknown_key_in_peer",
        "[network]\nprovider = \"tailscale\"\n\n[[network.wireguard.peers]]\nname = \"a\"\npubkey = \"x\"\n",
        6, 1, "network.wireguard.peers[0].pubkey", "unknown key `pubkey`",
    ),
    case(
        "unknown_key_in_inline_service",
        "[services]\ngateway = { port = 443, mode = \"tcp\", proto = \"h2\" }\n",
        2, 39, "services.gateway.proto", "unknown key `proto`",
    ),
    case(
        "unknown_key_in_workload_identity",
        "[network.tailscale.workload_identity]\nclient_id = \"k1\"\nsecret = \"x\"\n",
        3, 1, "network.tailscale.workload_identity.secret", "unknown key `secret`",
    ),
    case(
        "unknown_key_in_log",
        "[log]\nlevel = \"info\"\nformat = \"json\"\n",
        3, 1, "log.format", "expected `level`",
    ),
    // Networks and addresses.
    case(
        "mesh_cidr_not_a_cidr",
        "[network.wireguard]\nmesh_cidr = \"10.100.0.0/33\"\naddress = \"10.100.0.5\"\n",
        2, 13, "network.wireguard.mesh_cidr", "CIDR notation",
    ),
    case(
        "mesh_cidr_with_host_bits",
        "[network.wireguard]\nmesh_cidr = \"10.100.0.1/16\"\naddress = \"10.100.0.5\"\n",
        2, 13, "network.wireguard.mesh_cidr", "no host bits set (did you mean \"10.100.0.0/16\"?)",
    ),
    case(
        "address_outside_mesh_cidr",
        "[network.wireguard]\nmesh_cidr = \"10.100.0.0/16\"\naddress = \"10.200.0.5/16\"\n",
        3, 11, "network.wireguard.address",
        "expected an address inside mesh_cidr 10.100.0.0/16, got 10.200.0.5/16",
    ),
    case(
        "address_is_the_network_address",
        "[network.wireguard]\naddress = \"10.100.0.0\"\n",
        2, 11, "network.wireguard.address", "network address",
    ),
    case(
        "address_not_an_ip",
        "[network.wireguard]\naddress = \"10.100.0.300/16\"\n",
        2, 11, "network.wireguard.address", "expected an address such as",
    ),
    case(
        "missing_address_with_wireguard_provider",
        "[network]\nprovider = \"wireguard\"\n\n[network.wireguard]\nlisten_port = 51820\n",
        4, 1, "network.wireguard.address", "required when network.provider = \"wireguard\"",
    ),
    case(
        "metrics_listen_without_port",
        "[api]\nmetrics_listen = \"127.0.0.1\"\n",
        2, 18, "api.metrics_listen", "an address and port",
    ),
    // Tailscale.
    case(
        "tag_without_prefix",
        "[network.tailscale]\ntags = [\"tag:ok\", \"gpu\"]\n",
        2, 19, "network.tailscale.tags[1]", "\"tag:<name>\"",
    ),
    case(
        "tag_with_uppercase",
        "[network.tailscale]\ntags = [\"tag:GPU\"]\n",
        2, 9, "network.tailscale.tags[0]", "\"tag:<name>\"",
    ),
    case(
        "two_auth_methods",
        "[network]\nprovider = \"tailscale\"\n[network.tailscale]\nauth_key_env = \"TS_AUTHKEY\"\nauth_key_file = \"/etc/clawbernetes/ts-authkey\"\n",
        5, 17, "network.tailscale.auth_key_file", "at most one Tailscale auth method",
    ),
    case(
        "auth_key_env_and_workload_identity",
        "[network.tailscale]\nauth_key_env = \"TS\"\ntags = [\"tag:a\"]\n[network.tailscale.workload_identity]\nclient_id = \"k1\"\naudience = \"aud\"\n",
        4, 1, "network.tailscale.workload_identity", "found 2: network.tailscale.auth_key_env (line 2",
    ),
    case(
        "workload_identity_without_tags",
        "[network]\nprovider = \"tailscale\"\n[network.tailscale.workload_identity]\nclient_id = \"k1\"\naudience = \"aud\"\n",
        3, 1, "network.tailscale.tags", "at least one tag",
    ),
    case(
        "workload_identity_with_both_token_sources",
        "[network.tailscale]\ntags = [\"tag:a\"]\n[network.tailscale.workload_identity]\nclient_id = \"k1\"\nid_token_file = \"/run/token\"\naudience = \"aud\"\n",
        6, 12, "network.tailscale.workload_identity.audience", "exactly one of id_token_file or audience",
    ),
    case(
        "workload_identity_without_client_id",
        "[network.tailscale]\ntags = [\"tag:a\"]\n[network.tailscale.workload_identity]\naudience = \"aud\"\n",
        3, 1, "network.tailscale.workload_identity.client_id", "OAuth client ID",
    ),
    case(
        "invalid_auth_key_env_name",
        "[network.tailscale]\nauth_key_env = \"TS-AUTHKEY\"\n",
        2, 16, "network.tailscale.auth_key_env", "environment variable name",
    ),
    case(
        "control_url_without_scheme",
        "[network.tailscale]\ncontrol_url = \"headscale.example.net\"\n",
        2, 15, "network.tailscale.control_url", "https://",
    ),
    // Services.
    case(
        "service_name_with_uppercase_and_underscore",
        "[services.Bad_Name]\nport = 80\nmode = \"tcp\"\n",
        1, 1, "services.Bad_Name", "DNS label",
    ),
    case(
        "tailscale_service_name_with_leading_dash",
        "[network.tailscale.services]\n-gateway = { port = 443, mode = \"tcp\" }\n",
        2, 12, "network.tailscale.services.-gateway", "DNS label",
    ),
    case(
        "service_declared_twice_with_different_ports",
        "[services.gateway]\nport = 443\nmode = \"tcp\"\n\n[network.tailscale.services]\ngateway = { port = 8443, mode = \"tcp\" }\n",
        6, 11, "network.tailscale.services.gateway", "declared twice with different settings",
    ),
    case(
        "tls_with_tcp_mode",
        "[services.web]\nport = 443\nmode = \"tcp\"\ntls = true\n",
        4, 7, "services.web.tls", "tls applies only to mode = \"http\"",
    ),
    case(
        "service_port_zero",
        "[services.web]\nport = 0\nmode = \"http\"\n",
        2, 8, "services.web.port", "expected a port number 1-65535, got 0",
    ),
    case(
        "service_without_mode",
        "[services.web]\nport = 80\n",
        1, 1, "services.web.mode", "mode = \"tcp\" or mode = \"http\"",
    ),
    case(
        "service_mode_unknown",
        "[services.web]\nport = 80\nmode = \"udp\"\n",
        3, 8, "services.web.mode", "expected a mode \"tcp\" or \"http\", got \"udp\"",
    ),
    // WireGuard interface and peers.
    case(
        "listen_port_too_large",
        "[network.wireguard]\nlisten_port = 70000\n",
        2, 15, "network.wireguard.listen_port", "expected a port number 1-65535, got 70000",
    ),
    case(
        "interface_name_too_long",
        "[network.wireguard]\ninterface = \"clawbernetes-mesh0\"\n",
        2, 13, "network.wireguard.interface", "1-15 bytes",
    ),
    case(
        "mtu_below_minimum",
        "[network.wireguard]\nmtu = 576\n",
        2, 7, "network.wireguard.mtu", "1280-9000",
    ),
    case(
        "backend_unknown",
        "[network.wireguard]\nbackend = \"ebpf\"\n",
        2, 11, "network.wireguard.backend", "\"auto\", \"kernel\" or \"userspace\"",
    ),
    case(
        "peer_public_key_not_base64",
        "[[network.wireguard.peers]]\nname = \"gpu-02\"\npublic_key = \"not-a-key\"\nallowed_ips = [\"10.100.0.6/32\"]\n",
        3, 14, "network.wireguard.peers[0].public_key", "44 characters of base64",
    ),
    case(
        "second_peer_endpoint_without_port",
        "[[network.wireguard.peers]]\nname = \"gpu-02\"\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\nallowed_ips = [\"10.100.0.6/32\"]\n\n[[network.wireguard.peers]]\nname = \"gpu-03\"\npublic_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\nendpoint = \"gpu-03.example.net\"\nallowed_ips = [\"10.100.0.7/32\"]\n",
        9, 12, "network.wireguard.peers[1].endpoint", "\"host:port\"",
    ),
    case(
        "duplicate_peer_public_key",
        "[[network.wireguard.peers]]\nname = \"gpu-02\"\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\nallowed_ips = [\"10.100.0.6/32\"]\n\n[[network.wireguard.peers]]\nname = \"gpu-03\"\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\nallowed_ips = [\"10.100.0.7/32\"]\n",
        8, 14, "network.wireguard.peers[1].public_key", "peers[0] already uses",
    ),
    case(
        "peer_without_allowed_ips",
        "[[network.wireguard.peers]]\nname = \"gpu-02\"\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\n",
        1, 1, "network.wireguard.peers[0].allowed_ips", "at least one network",
    ),
    // Durations, levels, providers, paths, names.
    case(
        "duration_without_unit",
        "[gpu]\npoll_interval = \"10\"\n",
        2, 17, "gpu.poll_interval", "a duration such as \"10s\"",
    ),
    case(
        "duration_below_one_second",
        "[network.wireguard]\nreconcile_interval = \"500ms\"\n",
        2, 22, "network.wireguard.reconcile_interval", "between 1s and",
    ),
    case(
        "unknown_log_level",
        "[log]\nlevel = \"verbose\"\n",
        2, 9, "log.level", "\"error\", \"warn\", \"info\", \"debug\" or \"trace\"",
    ),
    case(
        "unknown_provider",
        "[network]\nprovider = \"zerotier\"\n",
        2, 12, "network.provider", "expected a mesh provider (\"wireguard\"",
    ),
    case(
        "gpu_required_but_disabled",
        "[gpu]\nenabled = false\nrequired = true\n",
        3, 12, "gpu.required", "when enabled = false",
    ),
    case(
        "relative_state_dir",
        "[node]\nstate_dir = \"var/lib/clawbernetes\"\n",
        2, 13, "node.state_dir", "an absolute path",
    ),
    case(
        "invalid_node_name",
        "[node]\nname = \"GPU_01\"\n",
        2, 8, "node.name", "DNS label",
    ),
    // TOML syntax.
    case(
        "unterminated_string",
        "[log]\nlevel = \"info\n[gpu]\n",
        2, 14, "log.level", "invalid basic string",
    ),
    case(
        "duplicate_key",
        "[gpu]\nenabled = true\nenabled = false\n",
        3, 1, "gpu.enabled", "duplicate key",
    ),
    case(
        "duplicate_table",
        "[gpu]\nenabled = true\n\n[gpu]\nrequired = false\n",
        4, 2, "gpu", "duplicate key",
    ),
    case(
        "value_missing",
        "[network.wireguard]\nmtu =\n",
        2, 6, "network.wireguard.mtu", "expected",
    ),
];

fn check_config(path: &Path) -> Output {
    Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .env_remove("CLAWBERNETES_CONFIG")
        .output()
        .expect("run clawnode")
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

fn assert_no_panic(output: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(
        output.status.code(),
        Some(101),
        "{what}: exit 101\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{what}: panicked\n{stderr}");
}

#[test]
fn users_tailscale_block_passes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "users", USERS_BLOCK);
    let output = check_config(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with(&format!("config OK: {}\n", path.display())),
        "{stdout}"
    );
    assert!(stdout.contains("network: tailscale"), "{stdout}");
    assert!(stdout.contains("gateway 443/tcp") && stdout.contains("molt-provider 8443/tcp"));
}

#[test]
fn shipped_example_config_passes() {
    let output = check_config(Path::new(SHIPPED));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("network: wireguard"), "{stdout}");
    assert!(
        stdout.contains("address 10.100.0.5/16 in mesh 10.100.0.0/16"),
        "{stdout}"
    );
}

#[test]
fn malformed_configs_exit_78_with_position_key_and_reason() {
    assert!(MALFORMED.len() >= 30, "only {} cases", MALFORMED.len());
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for case in MALFORMED {
        let path = write_config(dir.path(), case.name, case.toml);
        let output = check_config(&path);
        assert_no_panic(&output, case.name);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        if output.status.code() != Some(EX_CONFIG) || stdout.contains("config OK") {
            failures.push(format!(
                "{}: exit {:?}\n{stdout}{stderr}",
                case.name, output.status
            ));
            continue;
        }
        let position = format!("{}:{}:{}: ", path.display(), case.line, case.col);
        let matched = stderr.lines().any(|line| {
            line.strip_prefix(&position).is_some_and(|rest| {
                rest.starts_with(&format!("{}: ", case.key)) && rest.contains(case.reason)
            })
        });
        if !matched {
            failures.push(format!(
                "{}: no line starting {position}{}: containing {:?} in:\n{stderr}",
                case.name, case.key, case.reason
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn case_names_are_distinct() {
    let mut names: Vec<&str> = MALFORMED.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), MALFORMED.len());
}

#[test]
fn every_error_line_has_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[node]\nname = \"Bad\"\n[network.wireguard]\nmtu = 1\nlisten_port = 0\n[log]\nlevel = \"x\"\n";
    let path = write_config(dir.path(), "several", text);
    let output = check_config(&path);
    assert_eq!(output.status.code(), Some(EX_CONFIG));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let prefix = format!("{}:", path.display());
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 5, "all errors reported:\n{stderr}");
    for line in lines {
        let rest = line
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{line}"));
        let mut parts = rest.splitn(3, ':');
        let line_no: usize = parts.next().unwrap().parse().unwrap();
        let col: usize = parts.next().unwrap().parse().unwrap();
        assert!(line_no >= 1 && col >= 1, "{line}");
    }
}

#[test]
fn missing_file_exits_78_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let output = check_config(&path);
    assert_no_panic(&output, "missing file");
    assert_eq!(output.status.code(), Some(EX_CONFIG));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!("{}:1:1: cannot read", path.display())),
        "{stderr}"
    );
}

#[test]
fn config_env_var_selects_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(dir.path(), "good", USERS_BLOCK);
    let bad = write_config(dir.path(), "bad", "[log]\nlevel = \"loud\"\n");
    for (path, code) in [(&good, 0), (&bad, EX_CONFIG)] {
        let output = Command::new(BIN)
            .arg("check-config")
            .env("CLAWBERNETES_CONFIG", path)
            .output()
            .expect("run clawnode");
        assert_no_panic(&output, "env");
        assert_eq!(output.status.code(), Some(code), "{}", path.display());
        let all = [output.stdout, output.stderr].concat();
        assert!(
            String::from_utf8_lossy(&all).contains(&path.display().to_string()),
            "{}",
            path.display()
        );
    }
}

#[test]
fn auth_key_never_appears_in_output() {
    let dir = tempfile::tempdir().unwrap();
    let valid = "[network]\nprovider = \"tailscale\"\n[network.tailscale]\nauth_key = \"tskey-auth-SECRET\"\n";
    let path = write_config(dir.path(), "valid", valid);
    let output = check_config(&path);
    assert_eq!(output.status.code(), Some(0));
    let all = String::from_utf8_lossy(&[output.stdout, output.stderr].concat()).into_owned();
    assert!(
        !all.contains("SECRET") && all.contains("auth key (inline)"),
        "{all}"
    );

    let invalid = valid.replace("tskey-auth-SECRET", "tskey auth SECRET");
    let path = write_config(
        dir.path(),
        "invalid",
        &format!("{invalid}auth_key_env = \"X\"\n"),
    );
    let output = check_config(&path);
    assert_eq!(output.status.code(), Some(EX_CONFIG));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("network.tailscale.auth_key: "), "{stderr}");
    assert!(!stderr.contains("SECRET"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("SECRET"));
}

#[test]
fn output_piped_into_a_closed_reader_ends_quietly_without_a_panic() {
    // `clawnode manpage | head -1`: the reader goes away while clawnode still writes.
    let mut child = Command::new(BIN)
        .arg("manpage")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}",
        out.status
    );
}
