//! Behaviour of `parse` and `load` on whole documents.

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const USERS_BLOCK: &str = include_str!("../../tests/fixtures/config/users-block.toml");

const SHIPPED: &str = include_str!("../../config/clawbernetes.toml");

/// A valid WireGuard baseline; tests append to it. Line 1 is `[node]`.
const WG_BASE: &str = "[node]\nname = \"gpu-01\"\n[network]\nprovider = \"wireguard\"\n[network.wireguard]\naddress = \"10.100.0.5/16\"\n";

const KEY_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const KEY_B: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn ok(text: &str) -> Config {
    match parse(Path::new("test.toml"), text) {
        Ok(config) => config,
        Err(errors) => panic!("expected a valid config, got:\n{errors}"),
    }
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(Path::new("test.toml"), text) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(errors) => errors.0,
    }
}

/// The one error about `key`, asserting its line.
fn error_at(text: &str, key: &str, line: usize) -> ConfigError {
    let all = errors(text);
    let found: Vec<&ConfigError> = all.iter().filter(|e| e.key == key).collect();
    assert_eq!(found.len(), 1, "one error for {key} expected in {all:#?}");
    assert_eq!(found[0].line, line, "line of {}", found[0]);
    found[0].clone()
}

#[test]
fn users_tailscale_block_is_accepted_as_written() {
    let config = ok(&format!("[node]\nname = \"gpu-01\"\n{USERS_BLOCK}"));
    assert_eq!(config.network.provider, ProviderKind::Tailscale);
    let ts = &config.network.tailscale;
    assert_eq!(ts.auth, Some(TailscaleAuth::KeyEnv("TS_AUTHKEY".into())));
    assert_eq!(ts.tailnet.as_deref(), Some("your-org.tailscale.net"));
    let tags: Vec<&str> = ts.tags.iter().map(Tag::as_str).collect();
    assert_eq!(tags, ["tag:clawbernetes", "tag:gpu-provider"]);
    assert_eq!(config.network.wireguard.address, None);
    let services: Vec<(&str, u16)> = config
        .services
        .iter()
        .map(|(name, spec)| (name.as_str(), spec.port))
        .collect();
    assert_eq!(services, [("gateway", 443), ("molt-provider", 8443)]);
    assert!(config.services.values().all(|s| s.mode == ServiceMode::Tcp));
}

#[test]
fn shipped_example_config_is_valid() {
    let config = ok(SHIPPED);
    assert_eq!(config.network.provider, ProviderKind::Wireguard);
    assert_eq!(
        config.network.wireguard.address,
        Some("10.100.0.5/16".parse().unwrap())
    );
    assert_eq!(config.services.len(), 2);
}

#[test]
fn shipped_example_commented_blocks_are_valid_when_uncommented() {
    // Uncomment the example peer and the optional `key = value` lines, except the extra auth
    // methods (only one may be set), the duplicate tailscale service example and the etcd
    // store's keys (the example keeps store = "sqlite").
    let is_setting = |body: &str| {
        let key: String = body
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        (!key.is_empty() && body[key.len()..].starts_with(" = "))
            || body.starts_with("[[network.wireguard.peers]]")
            || body.starts_with("[services.")
    };
    let skipped = [
        "auth_key",
        "client_id",
        "id_token_file",
        "audience",
        "gateway",
        "etcd_",
    ];
    let uncommented: String = SHIPPED
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(body) if is_setting(body) && !skipped.iter().any(|k| body.starts_with(k)) => body,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = ok(&uncommented);
    let peer = &config.network.wireguard.peers[0];
    assert_eq!(peer.name, "gpu-02");
    assert_eq!(peer.persistent_keepalive, Some(25));
    assert_eq!(config.services.len(), 3);
    assert_eq!(config.api.socket_group.as_deref(), Some("clawbernetes"));
}

#[test]
fn missing_tables_take_every_default() {
    let config = ok("[node]\nname = \"gpu-01\"\n[network.wireguard]\naddress = \"10.100.0.5\"\n");
    assert_eq!(config.node.state_dir, Path::new("/var/lib/clawbernetes"));
    assert_eq!(config.node.runtime_dir, Path::new("/run/clawbernetes"));
    assert_eq!(
        config.api.socket,
        Path::new("/run/clawbernetes/clawnode.sock")
    );
    assert_eq!(config.api.socket_group, None);
    assert_eq!(config.api.metrics_listen, None);
    let wg = &config.network.wireguard;
    assert_eq!(config.network.provider, ProviderKind::Wireguard);
    assert_eq!(wg.interface.as_str(), "claw0");
    assert_eq!(wg.backend, WgBackend::Auto);
    assert_eq!(wg.userspace_implementation, Path::new("wireguard-go"));
    assert_eq!(
        (wg.listen_port, wg.node_info_port, wg.mtu),
        (51820, 51821, 1420)
    );
    assert_eq!(wg.fwmark, None);
    assert_eq!(wg.mesh_cidr.to_string(), "10.100.0.0/16");
    assert_eq!(wg.address.unwrap().to_string(), "10.100.0.5/16");
    assert_eq!(
        wg.private_key_file,
        Path::new("/var/lib/clawbernetes/wireguard.key")
    );
    assert_eq!(wg.peers_dir, Path::new("/etc/clawbernetes/peers.d"));
    assert_eq!(wg.reconcile_interval, Duration::from_secs(30));
    assert!(!wg.allow_unsafe_routes);
    let ts = &config.network.tailscale;
    assert_eq!(ts.socket, Path::new("/var/run/tailscale/tailscaled.sock"));
    assert_eq!(ts.auth, None);
    assert_eq!(ts.hostname_prefix.as_str(), "clawnode");
    assert!(ts.tags.is_empty());
    assert_eq!(ts.relay_server_port, None, "the relay pref is left alone");
    assert!(!ts.relay_clear_on_stop);
    assert_eq!(
        config.gpu,
        GpuConfig {
            enabled: true,
            required: false,
            nvml_library: None,
            poll_interval: Duration::from_secs(10),
            unhealthy_xids: [48, 63, 64, 74, 79, 94, 95, 119, 120].into_iter().collect(),
            xid_hold: Duration::from_secs(3600),
        }
    );
    assert_eq!(config.log.level, LogLevel::Info);
    assert!(config.services.is_empty());
}

#[test]
fn node_name_defaults_to_the_first_hostname_label_lowercased() {
    let hostname = nix::unistd::gethostname().unwrap();
    let label = hostname
        .to_string_lossy()
        .split('.')
        .next()
        .unwrap()
        .to_lowercase();
    let result = parse(Path::new("t.toml"), "[network]\nprovider = \"tailscale\"\n");
    match label.parse::<NodeName>() {
        Ok(name) => assert_eq!(result.unwrap().node.name, name),
        Err(_) => assert_eq!(result.unwrap_err().0[0].key, "node.name"),
    }
}

#[test]
fn derived_paths_follow_state_and_runtime_dirs() {
    let config = ok(&WG_BASE.replace(
        "[node]\n",
        "[node]\nstate_dir = \"/srv/claw\"\nruntime_dir = \"/run/claw\"\n",
    ));
    assert_eq!(config.api.socket, Path::new("/run/claw/clawnode.sock"));
    assert_eq!(
        config.network.wireguard.private_key_file,
        Path::new("/srv/claw/wireguard.key")
    );
}

#[test]
fn bare_address_takes_the_mesh_prefix() {
    let config = ok(&WG_BASE.replace("10.100.0.5/16", "10.100.3.7"));
    assert_eq!(
        config.network.wireguard.address.unwrap().to_string(),
        "10.100.3.7/16"
    );
}

#[test]
fn address_outside_mesh_cidr_is_rejected_with_its_position() {
    let err = error_at(
        &WG_BASE.replace("10.100.0.5/16", "10.200.0.5/16"),
        "network.wireguard.address",
        6,
    );
    assert_eq!(err.col, 11);
    assert_eq!(
        err.to_string(),
        "test.toml:6:11: network.wireguard.address: expected an address inside mesh_cidr 10.100.0.0/16, got 10.200.0.5/16"
    );
}

#[test]
fn network_address_of_the_mesh_is_not_a_node_address() {
    let err = error_at(
        &WG_BASE.replace("10.100.0.5/16", "10.100.0.0/16"),
        "network.wireguard.address",
        6,
    );
    assert!(err.message.contains("network address"), "{err}");
}

#[test]
fn address_prefix_wider_than_the_mesh_is_rejected() {
    let err = error_at(
        &WG_BASE.replace("10.100.0.5/16", "10.100.0.5/8"),
        "network.wireguard.address",
        6,
    );
    assert!(err.message.contains("/16 or longer"), "{err}");
}

#[test]
fn mesh_cidr_with_host_bits_suggests_the_network() {
    let err = error_at(
        &format!("{WG_BASE}mesh_cidr = \"10.100.0.1/16\"\n"),
        "network.wireguard.mesh_cidr",
        7,
    );
    assert!(
        err.message.contains("did you mean \"10.100.0.0/16\""),
        "{err}"
    );
}

#[test]
fn wireguard_provider_requires_an_address() {
    let err = error_at(
        "[node]\nname = \"n\"\n[network]\nprovider = \"wireguard\"\n\n[network.wireguard]\nmtu = 1400\n",
        "network.wireguard.address",
        6,
    );
    assert!(err.message.starts_with("missing"), "{err}");
    // Without a [network.wireguard] table the provider line is what demands it.
    error_at(
        "[node]\nname = \"n\"\n[network]\nprovider = \"wireguard\"\n",
        "network.wireguard.address",
        4,
    );
}

#[test]
fn every_semantic_error_is_reported_not_just_the_first() {
    let text = format!(
        "{WG_BASE}listen_port = 0\nmtu = 100\nreconcile_interval = \"soon\"\n[log]\nlevel = \"loud\"\n[services.Bad_Name]\nport = 1\nmode = \"tcp\"\n"
    );
    let all = errors(&text);
    let keys: Vec<&str> = all.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "network.wireguard.listen_port",
            "network.wireguard.mtu",
            "network.wireguard.reconcile_interval",
            "log.level",
            "services.Bad_Name",
        ]
    );
    let lines: Vec<usize> = all.iter().map(|e| e.line).collect();
    assert_eq!(lines, [7, 8, 9, 11, 12]);
}

#[test]
fn two_auth_methods_are_rejected_naming_each_location() {
    let text = "[node]\nname = \"n\"\n[network]\nprovider = \"tailscale\"\n[network.tailscale]\nauth_key_file = \"/etc/k\"\nauth_key_env = \"TS_AUTHKEY\"\n";
    let err = error_at(text, "network.tailscale.auth_key_env", 7);
    assert!(
        err.message
            .contains("network.tailscale.auth_key_file (line 6, column 17)")
            && err
                .message
                .contains("network.tailscale.auth_key_env (line 7, column 16)"),
        "{err}"
    );
}

#[test]
fn no_auth_method_is_allowed() {
    let config = ok("[node]\nname = \"n\"\n[network]\nprovider = \"tailscale\"\n");
    assert_eq!(config.network.tailscale.auth, None);
}

#[test]
fn workload_identity_needs_client_id_one_token_source_and_tags() {
    let base = "[node]\nname = \"n\"\n[network]\nprovider = \"tailscale\"\n[network.tailscale]\ntags = [\"tag:gpu\"]\n[network.tailscale.workload_identity]\n";
    let config = ok(&format!("{base}client_id = \"k1\"\naudience = \"aud\"\n"));
    assert_eq!(
        config.network.tailscale.auth,
        Some(TailscaleAuth::WorkloadIdentity {
            client_id: "k1".into(),
            id_token: IdTokenSource::Audience("aud".into()),
        })
    );
    let config = ok(&format!(
        "{base}client_id = \"k1\"\nid_token_file = \"/run/t\"\n"
    ));
    assert!(matches!(
        config.network.tailscale.auth,
        Some(TailscaleAuth::WorkloadIdentity {
            id_token: IdTokenSource::File(_),
            ..
        })
    ));

    let both =
        format!("{base}client_id = \"k1\"\nid_token_file = \"/run/t\"\naudience = \"aud\"\n");
    let err = error_at(&both, "network.tailscale.workload_identity.audience", 10);
    assert!(err.message.contains("exactly one"), "{err}");

    let neither = format!("{base}client_id = \"k1\"\n");
    let err = error_at(&neither, "network.tailscale.workload_identity", 7);
    assert!(err.message.contains("found neither"), "{err}");

    error_at(
        &format!("{base}audience = \"a\"\n"),
        "network.tailscale.workload_identity.client_id",
        7,
    );

    let no_tags = format!("{base}client_id = \"k1\"\naudience = \"aud\"\n")
        .replace("tags = [\"tag:gpu\"]\n", "");
    let err = error_at(&no_tags, "network.tailscale.tags", 6);
    assert!(err.message.contains("at least one tag"), "{err}");
    let empty_tags =
        format!("{base}client_id = \"k1\"\naudience = \"aud\"\n").replace("[\"tag:gpu\"]", "[]");
    error_at(&empty_tags, "network.tailscale.tags", 6);
}

#[test]
fn a_relay_port_must_be_a_fixed_udp_port() {
    let base = "[network]\nprovider = \"tailscale\"\n[network.tailscale]\n";
    let config = ok(&format!(
        "{base}relay_server_port = 40000\nrelay_clear_on_stop = true\n"
    ));
    assert_eq!(config.network.tailscale.relay_server_port, Some(40000));
    assert!(config.network.tailscale.relay_clear_on_stop);
    assert!(
        config
            .summary()
            .contains("peer relay on UDP 40000 (cleared at stop)")
    );
    for bad in ["0", "65536", "-1"] {
        let found = errors(&format!("{base}relay_server_port = {bad}\n"));
        assert_eq!(found[0].key, "network.tailscale.relay_server_port", "{bad}");
        assert!(
            found[0].message.contains("a UDP port 1-65535"),
            "{bad}: {found:?}"
        );
    }
}

#[test]
fn tags_must_have_the_tag_prefix() {
    let text = "[node]\nname = \"n\"\n[network.tailscale]\ntags = [\"tag:ok\", \"gpu\"]\n[network.wireguard]\naddress = \"10.100.0.5\"\n";
    let err = error_at(text, "network.tailscale.tags[1]", 4);
    assert_eq!(err.col, 19);
    assert!(err.message.contains("\"tag:<name>\""), "{err}");
}

#[test]
fn same_service_in_both_tables_merges_when_identical() {
    let text = format!(
        "{WG_BASE}[services.gateway]\nport = 443\nmode = \"tcp\"\n[network.tailscale.services]\ngateway = {{ port = 443, mode = \"tcp\" }}\n"
    );
    assert_eq!(ok(&text).services.len(), 1);
}

#[test]
fn same_service_in_both_tables_with_different_values_is_rejected_at_the_second() {
    let text = format!(
        "{WG_BASE}[network.tailscale.services]\nweb = {{ port = 80, mode = \"http\" }}\n[services.web]\nport = 8080\nmode = \"http\"\n"
    );
    let err = error_at(&text, "services.web", 9);
    assert!(
        err.message
            .contains("network.tailscale.services.web (line 8)"),
        "{err}"
    );
}

#[test]
fn http_services_default_to_tls_and_tcp_services_refuse_tls() {
    let text = format!(
        "{WG_BASE}[services.a]\nport = 1\nmode = \"http\"\n[services.b]\nport = 2\nmode = \"http\"\ntls = false\n"
    );
    let config = ok(&text);
    let modes: Vec<ServiceMode> = config.services.values().map(|s| s.mode).collect();
    assert_eq!(
        modes,
        [
            ServiceMode::Http { tls: true },
            ServiceMode::Http { tls: false }
        ]
    );
    let err = error_at(
        &format!("{WG_BASE}[services.c]\nport = 1\nmode = \"tcp\"\ntls = true\n"),
        "services.c.tls",
        10,
    );
    assert!(err.message.contains("only to mode = \"http\""), "{err}");
}

#[test]
fn service_ports_must_be_in_range() {
    for (port, got) in [("0", "got 0"), ("70000", "got 70000"), ("-1", "got -1")] {
        let err = error_at(
            &format!("{WG_BASE}[services.a]\nport = {port}\nmode = \"tcp\"\n"),
            "services.a.port",
            8,
        );
        assert!(err.message.contains(got), "{err}");
    }
}

#[test]
fn peers_are_resolved_with_keepalive_zero_meaning_off() {
    let text = format!(
        "{WG_BASE}[[network.wireguard.peers]]\nname = \"a\"\npublic_key = \"{KEY_A}\"\nendpoint = \"[fd00::1]:51820\"\nallowed_ips = [\"10.100.0.6/32\", \"10.100.9.9\"]\npersistent_keepalive = 0\n"
    );
    let config = ok(&text);
    let peer = &config.network.wireguard.peers[0];
    assert_eq!(peer.public_key.as_str(), KEY_A);
    assert_eq!(peer.endpoint.as_ref().unwrap().host(), "fd00::1");
    assert_eq!(peer.persistent_keepalive, None);
    let ips: Vec<String> = peer.allowed_ips.iter().map(ToString::to_string).collect();
    assert_eq!(ips, ["10.100.0.6/32", "10.100.9.9/32"]);
}

#[test]
fn duplicate_peer_names_and_keys_are_reported_at_the_second_peer() {
    let peer = |name: &str, key: &str| {
        format!(
            "[[network.wireguard.peers]]\nname = \"{name}\"\npublic_key = \"{key}\"\nallowed_ips = [\"10.100.0.6/32\"]\n"
        )
    };
    let text = format!(
        "{WG_BASE}{}{}{}",
        peer("a", KEY_A),
        peer("a", KEY_B),
        peer("c", KEY_A)
    );
    let err = error_at(&text, "network.wireguard.peers[1].name", 12);
    assert!(err.message.contains("peers[0] already uses"), "{err}");
    let err = error_at(&text, "network.wireguard.peers[2].public_key", 17);
    assert!(err.message.contains("peers[0] already uses"), "{err}");
}

#[test]
fn peer_without_required_keys_is_reported_at_its_header() {
    let text = format!("{WG_BASE}[[network.wireguard.peers]]\nendpoint = \"h:1\"\n");
    let all = errors(&text);
    let keys: Vec<(&str, usize)> = all.iter().map(|e| (e.key.as_str(), e.line)).collect();
    assert_eq!(
        keys,
        [
            ("network.wireguard.peers[0].name", 7),
            ("network.wireguard.peers[0].public_key", 7),
            ("network.wireguard.peers[0].allowed_ips", 7),
        ]
    );
}

#[test]
fn durations_use_humantime_with_a_one_second_floor() {
    let config = ok(&format!(
        "{WG_BASE}reconcile_interval = \"1m30s\"\n[gpu]\npoll_interval = \"2s\"\n"
    ));
    assert_eq!(
        config.network.wireguard.reconcile_interval,
        Duration::from_secs(90)
    );
    assert_eq!(config.gpu.poll_interval, Duration::from_secs(2));
    for bad in ["500ms", "10", "fast", "1000y"] {
        let err = error_at(
            &format!("{WG_BASE}[gpu]\npoll_interval = \"{bad}\"\n"),
            "gpu.poll_interval",
            8,
        );
        assert!(err.message.contains("a duration such as"), "{err}");
    }
}

#[test]
fn fwmark_zero_means_unset() {
    assert_eq!(
        ok(&format!("{WG_BASE}fwmark = 0\n"))
            .network
            .wireguard
            .fwmark,
        None
    );
    assert_eq!(
        ok(&format!("{WG_BASE}fwmark = 0x51820\n"))
            .network
            .wireguard
            .fwmark,
        Some(0x51820)
    );
}

#[test]
fn allow_unsafe_routes_is_a_boolean_that_defaults_to_false() {
    let wg = ok(&format!("{WG_BASE}allow_unsafe_routes = true\n"))
        .network
        .wireguard;
    assert!(wg.allow_unsafe_routes);
    let err = error_at(
        &format!("{WG_BASE}allow_unsafe_routes = \"yes\"\n"),
        "network.wireguard.allow_unsafe_routes",
        7,
    );
    assert_eq!(
        err.message,
        "invalid type: string \"yes\", expected a boolean"
    );
}

#[test]
fn unknown_keys_name_the_key_and_list_the_expected_ones() {
    let err = error_at(
        &format!("{WG_BASE}listen-port = 1\n"),
        "network.wireguard.listen-port",
        7,
    );
    assert!(
        err.message
            .starts_with("unknown key `listen-port`, expected one of `interface`"),
        "{err}"
    );
    let err = error_at("[loggin]\nlevel = \"info\"\n", "loggin", 1);
    assert!(err.message.contains("`node`, `api`, `network`"), "{err}");
}

#[test]
fn type_errors_point_at_the_value() {
    let err = error_at(
        &format!("{WG_BASE}mtu = \"big\"\n"),
        "network.wireguard.mtu",
        7,
    );
    assert_eq!(err.col, 7);
    assert_eq!(
        err.message,
        "invalid type: string \"big\", expected an integer"
    );
}

#[test]
fn every_syntax_error_is_reported() {
    let all = errors("a = \"open\nb = 1\n[x]\nc = \nd = 1\nd = 2\n");
    let found: Vec<(usize, &str)> = all.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(found, [(1, "a"), (4, "x.c"), (6, "x.d")]);
    assert!(all[2].message.starts_with("duplicate key"), "{}", all[2]);
}

#[cfg(not(feature = "test-fakes"))]
#[test]
fn fake_provider_and_table_are_rejected_outside_test_builds() {
    error_at("[network]\nprovider = \"fake\"\n", "network.provider", 2);
    let err = error_at("[network.fake]\njoin_delay = \"1s\"\n", "network.fake", 1);
    assert!(err.message.contains("unknown key `fake`"), "{err}");
}

#[cfg(feature = "test-fakes")]
#[test]
fn fake_provider_is_available_in_test_builds() {
    let config = ok(
        "[node]\nname = \"n\"\n[network]\nprovider = \"fake\"\n[network.fake]\njoin_delay = \"2s\"\nfail_joins = 3\n",
    );
    assert_eq!(config.network.provider, ProviderKind::Fake);
    let fake = &config.network.fake;
    assert_eq!(fake.join_delay, Duration::from_secs(2));
    assert_eq!(fake.fail_joins, 3);
    assert_eq!(fake.fail_message, "fake mesh join failed");
    assert_eq!(fake.address, "10.100.0.5/16");
    assert!(config.summary().contains("network: fake"));
}

#[test]
fn secrets_stay_out_of_debug_summary_and_errors() {
    let text = "[node]\nname = \"n\"\n[network]\nprovider = \"tailscale\"\n[network.tailscale]\nauth_key = \"tskey-auth-SECRET\"\n";
    let config = ok(text);
    let Some(TailscaleAuth::Key(secret)) = &config.network.tailscale.auth else {
        panic!("expected an inline key");
    };
    assert_eq!(secret.expose(), "tskey-auth-SECRET");
    assert!(!format!("{config:?}").contains("SECRET"));
    assert!(!format!("{config:#?}").contains("SECRET"));
    assert!(!config.summary().contains("SECRET"));
    assert!(config.summary().contains("auth key (inline)"));

    let with_problems = [
        format!("{text}auth_key_env = \"TS\"\n"),
        text.replace("tskey-auth-SECRET", "tskey auth SECRET"),
        text.replace("tskey-auth-SECRET", "tskey-auth-SECRET\\n"),
        format!(
            "{text}tags = [\"bad\"]\n[network.tailscale.workload_identity]\nclient_id = \"\"\n"
        ),
    ];
    for text in with_problems {
        let all = errors(&text);
        for err in &all {
            assert!(!err.to_string().contains("SECRET"), "{err}");
        }
        assert!(all.iter().any(|e| e.key.starts_with("network.tailscale")));
    }
}

#[test]
fn summary_lists_node_provider_services_gpu_and_auth_kind() {
    let summary = ok(&format!("[node]\nname = \"gpu-01\"\n{USERS_BLOCK}")).summary();
    for part in [
        "node: gpu-01",
        "network: tailscale",
        "auth key from $TS_AUTHKEY",
        "tags tag:clawbernetes, tag:gpu-provider",
        "  gateway 443/tcp",
        "  molt-provider 8443/tcp",
        "gpu: enabled (optional), poll every 10s",
        "log: info",
    ] {
        assert!(summary.contains(part), "{part:?} missing from:\n{summary}");
    }
}

#[test]
fn unreadable_file_is_one_error_at_the_start_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.toml");
    let errors = load(&path).unwrap_err().0;
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (errors[0].line, errors[0].col, errors[0].key.as_str()),
        (1, 1, "")
    );
    let text = errors[0].to_string();
    assert!(
        text.starts_with(&format!("{}:1:1: cannot read", path.display())),
        "{text}"
    );
}

#[test]
fn invalid_utf8_is_reported_at_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, b"[log]\nlevel = \"in\xfffo\"\n").unwrap();
    let errors = load(&path).unwrap_err().0;
    assert_eq!((errors[0].line, errors[0].col), (2, 12));
    assert!(errors[0].message.contains("UTF-8"));
}

#[test]
fn load_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, SHIPPED).unwrap();
    assert_eq!(load(&path).unwrap(), ok(SHIPPED));
}

fn mutate(base: &str, edits: &[(usize, u8, char)]) -> String {
    let mut chars: Vec<char> = base.chars().collect();
    for &(pos, op, c) in edits {
        if chars.is_empty() {
            chars.push(c);
            continue;
        }
        let pos = pos % chars.len();
        match op % 3 {
            0 => chars[pos] = c,
            1 => chars.insert(pos, c),
            _ => {
                chars.remove(pos);
            }
        }
    }
    chars.into_iter().collect()
}

/// A drop-in a provisioning tool left half-written: thousands of broken lines.
fn broken_peer_file(lines: usize) -> String {
    "[[peers]]\nname = \n".repeat(lines)
}

#[test]
fn a_file_with_thousands_of_syntax_errors_lists_the_first_hundred_and_counts_the_rest() {
    let errors = match parse_peers(Path::new("peers.d/x.toml"), &broken_peer_file(5000)) {
        Ok(peers) => panic!("accepted {peers:?}"),
        Err(errors) => errors.0,
    };
    assert_eq!(errors.len(), MAX_ERRORS + 1);
    assert_eq!(errors[0].line, 2);
    assert_eq!(errors[MAX_ERRORS - 1].line, 2 * MAX_ERRORS);
    let last = &errors[MAX_ERRORS];
    assert_eq!(
        last.line,
        2 * MAX_ERRORS + 2,
        "placed at the first error not shown"
    );
    assert!(
        last.message.starts_with("4900 more errors not shown"),
        "{last}"
    );
}

#[test]
fn a_file_with_thousands_of_invalid_peers_lists_the_first_hundred_and_counts_the_rest() {
    let text: String = (0..3000)
        .map(|i| format!("[[peers]]\nname = \"p{i}\"\npublic_key = \"bad\"\nallowed_ips = [\"10.0.0.1/32\"]\n"))
        .collect();
    let errors = parse_peers(Path::new("x.toml"), &text).unwrap_err().0;
    assert_eq!(errors.len(), MAX_ERRORS + 1);
    assert!(
        errors[..MAX_ERRORS]
            .iter()
            .all(|e| e.key.ends_with("public_key"))
    );
    let last = &errors[MAX_ERRORS];
    assert_eq!(
        last.line,
        4 * MAX_ERRORS + 3,
        "the first public_key not shown"
    );
    assert!(
        last.message.starts_with("2900 more errors not shown"),
        "{last}"
    );
}

/// Found by fuzzing (`peers_file`): placing each error scanned the text before it, so the
/// time grew with the square of the file (2,000 broken lines took a second, 20,000 would
/// take minutes while the mesh waits).
#[test]
fn a_drop_in_with_tens_of_thousands_of_broken_lines_is_refused_in_linear_time() {
    let time = |lines: usize| {
        let text = broken_peer_file(lines);
        let started = std::time::Instant::now();
        assert!(parse_peers(Path::new("x.toml"), &text).is_err());
        started.elapsed()
    };
    let small = time(2_000);
    let large = time(20_000);
    // Ten times the lines: about ten times the time, where a square would be a hundred.
    assert!(
        large < small * 30 + std::time::Duration::from_millis(200),
        "2,000 lines: {small:?}, 20,000 lines: {large:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = parse(Path::new("fuzz.toml"), &text);
    }

    #[test]
    fn toml_like_text_never_panics(text in "([\\[\\]a-z_.=\"' \n0-9{},#-]|tag:|/16|\\\\u){0,120}") {
        let _ = parse(Path::new("fuzz.toml"), &text);
    }

    #[test]
    fn mutated_valid_configs_never_panic(
        base in prop::sample::select(vec![SHIPPED, USERS_BLOCK]),
        edits in prop::collection::vec(
            (any::<usize>(), any::<u8>(), prop::sample::select(vec![
                '"', '\'', '[', ']', '{', '}', '=', ',', '.', '\n', '#', '0', '9', 'a', '-', '/', ':', '\\', 'é', '\u{0}',
            ])),
            1..8,
        ),
    ) {
        let text = mutate(base, &edits);
        if let Err(errors) = parse(Path::new("fuzz.toml"), &text) {
            for err in &errors.0 {
                prop_assert!(err.line >= 1 && err.col >= 1);
                prop_assert!(err.line <= text.lines().count() + 1, "{err}");
            }
        }
    }
}

#[test]
fn adopting_an_existing_interface_is_off_unless_set_to_a_boolean() {
    assert!(!ok(WG_BASE).network.wireguard.adopt_existing_interface);
    let on = ok(&format!("{WG_BASE}adopt_existing_interface = true\n"));
    assert!(on.network.wireguard.adopt_existing_interface);
    let err = error_at(
        &format!("{WG_BASE}adopt_existing_interface = \"yes\"\n"),
        "network.wireguard.adopt_existing_interface",
        7,
    );
    assert!(err.message.contains("expected a boolean"), "{err}");
}

#[test]
fn a_join_token_makes_the_address_optional_and_the_gateway_grace_defaults_to_a_week() {
    let base =
        "[node]\nname = \"gpu-01\"\n[network]\nprovider = \"wireguard\"\n[network.wireguard]\n";
    let config = ok(&format!(
        "{base}join_token_file = \"/etc/clawbernetes/join-token\"\n"
    ));
    let wg = &config.network.wireguard;
    assert_eq!(wg.address, None);
    assert_eq!(
        wg.join_token,
        Some(JoinTokenSource::File("/etc/clawbernetes/join-token".into()))
    );
    assert_eq!(wg.gateway_offline_grace, Duration::from_secs(7 * 24 * 3600));
    let config = ok(&format!(
        "{base}join_token_env = \"CLAWNODE_JOIN_TOKEN\"\ngateway_offline_grace = \"2d\"\n"
    ));
    let wg = &config.network.wireguard;
    assert_eq!(
        wg.join_token,
        Some(JoinTokenSource::Env("CLAWNODE_JOIN_TOKEN".into()))
    );
    assert_eq!(wg.gateway_offline_grace, Duration::from_secs(2 * 24 * 3600));
}

#[test]
fn join_token_file_and_join_token_env_together_are_refused() {
    let text = "[node]\nname = \"gpu-01\"\n[network]\nprovider = \"wireguard\"\n[network.wireguard]\njoin_token_file = \"/t\"\njoin_token_env = \"T\"\n";
    let err = error_at(text, "network.wireguard.join_token_env", 7);
    assert!(err.message.contains("at most one"), "{err}");
    let err = error_at(
        &format!("{WG_BASE}join_token_file = \"relative/token\"\n"),
        "network.wireguard.join_token_file",
        7,
    );
    assert!(err.message.contains("absolute path"), "{err}");
}

// ---- service health checks (issue 14) ----

/// WG_BASE plus one service `svc` on 8443 with `extra` lines after `mode`; the service table
/// starts on line 7.
fn with_service(name: &str, extra: &str) -> String {
    format!("{WG_BASE}[services.{name}]\nport = 8443\nmode = \"tcp\"\n{extra}")
}

fn spec(config: &Config, name: &str) -> ServiceSpec {
    config.services[&name.parse::<ServiceName>().unwrap()].clone()
}

#[test]
fn every_service_gets_a_tcp_check_on_loopback_with_default_timing() {
    let config = ok(&with_service("web", ""));
    let web = spec(&config, "web");
    assert_eq!(
        web.check,
        CheckSpec {
            kind: CheckKind::Tcp {
                target: "127.0.0.1:8443".parse().unwrap()
            },
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
        }
    );
    assert!(!web.requires_gpus);
    assert_eq!(web.check.kind.to_string(), "tcp 127.0.0.1:8443");
}

#[test]
fn molt_provider_requires_gpus_by_default_only_while_gpus_are_probed() {
    let config = ok(&with_service("molt-provider", ""));
    assert!(spec(&config, "molt-provider").requires_gpus);
    let text = with_service("molt-provider", "[gpu]\nenabled = false\n");
    assert!(!spec(&ok(&text), "molt-provider").requires_gpus);
    let text = with_service("molt-provider", "requires_gpus = false\n");
    assert!(!spec(&ok(&text), "molt-provider").requires_gpus);
    let text = with_service("web", "requires_gpus = true\n");
    assert!(spec(&ok(&text), "web").requires_gpus);
}

#[test]
fn requiring_gpus_with_gpu_probing_disabled_is_refused() {
    let text = with_service("web", "requires_gpus = true\n[gpu]\nenabled = false\n");
    let err = error_at(&text, "services.web.requires_gpus", 10);
    assert!(
        err.message.contains("[gpu] enabled = false"),
        "{}",
        err.message
    );
}

#[test]
fn check_keys_are_read_with_their_ranges() {
    let text = with_service(
        "web",
        "[services.web.check]\ntype = \"tcp\"\ntarget = \"[::1]:9000\"\ninterval = \"1s\"\ntimeout = \"100ms\"\nrise = 1\nfall = 100\n",
    );
    let check = spec(&ok(&text), "web").check;
    assert_eq!(
        check,
        CheckSpec {
            kind: CheckKind::Tcp {
                target: "[::1]:9000".parse().unwrap()
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(100),
            rise: 1,
            fall: 100,
        }
    );
}

#[test]
fn http_check_defaults_follow_the_service_mode() {
    let text = format!(
        "{WG_BASE}[services.web]\nport = 8080\nmode = \"http\"\ntls = false\n[services.web.check]\ntype = \"http\"\npath = \"/healthz\"\n"
    );
    let check = spec(&ok(&text), "web").check;
    assert_eq!(
        check.kind,
        CheckKind::Http(HttpCheck {
            target: "127.0.0.1:8080".parse().unwrap(),
            path: "/healthz".into(),
            expect: (200, 399),
            tls: None,
        })
    );
    assert_eq!(
        check.kind.to_string(),
        "http GET http://127.0.0.1:8080/healthz expect 200-399"
    );
    // mode = "http" defaults to tls = true, so the check speaks https.
    let text = format!(
        "{WG_BASE}[services.web]\nport = 8443\nmode = \"http\"\n[services.web.check]\ntype = \"http\"\nexpect = \"204\"\ntls_skip_verify = true\n"
    );
    let check = spec(&ok(&text), "web").check;
    assert_eq!(
        check.kind,
        CheckKind::Http(HttpCheck {
            target: "127.0.0.1:8443".parse().unwrap(),
            path: "/".into(),
            expect: (204, 204),
            tls: Some(HttpsCheck {
                skip_verify: true,
                server_name: "localhost".into(),
            }),
        })
    );
    assert_eq!(
        check.kind.to_string(),
        "http GET https://127.0.0.1:8443/ expect 204 (certificate not verified)"
    );
}

#[test]
fn an_explicit_scheme_and_server_name_override_the_defaults() {
    let text = with_service(
        "web",
        "[services.web.check]\ntype = \"http\"\nscheme = \"https\"\nserver_name = \"gpu-01.example.com\"\n",
    );
    let CheckKind::Http(http) = spec(&ok(&text), "web").check.kind else {
        panic!("an http check");
    };
    assert_eq!(
        http.tls,
        Some(HttpsCheck {
            skip_verify: false,
            server_name: "gpu-01.example.com".into()
        })
    );
}

#[test]
fn type_none_opts_out_and_refuses_timing_keys() {
    let text = with_service("web", "[services.web.check]\ntype = \"none\"\n");
    assert_eq!(spec(&ok(&text), "web").check.kind, CheckKind::None);
    let text = with_service(
        "web",
        "[services.web.check]\ntype = \"none\"\ninterval = \"5s\"\n",
    );
    let err = error_at(&text, "services.web.check.interval", 12);
    assert!(err.message.contains("type = \"none\""), "{}", err.message);
}

#[test]
fn http_only_keys_with_a_tcp_check_are_refused() {
    for key in [
        "path = \"/\"",
        "expect = \"200\"",
        "scheme = \"http\"",
        "tls_skip_verify = true",
        "server_name = \"localhost\"",
    ] {
        let text = with_service("web", &format!("[services.web.check]\n{key}\n"));
        let name = key.split(' ').next().unwrap();
        let err = error_at(&text, &format!("services.web.check.{name}"), 11);
        assert!(
            err.message.contains("unless type = \"http\""),
            "{key}: {}",
            err.message
        );
    }
}

#[test]
fn tls_keys_with_plain_http_are_refused() {
    for key in ["tls_skip_verify = false", "server_name = \"localhost\""] {
        let text = with_service(
            "web",
            &format!("[services.web.check]\ntype = \"http\"\nscheme = \"http\"\n{key}\n"),
        );
        let name = key.split(' ').next().unwrap();
        let err = error_at(&text, &format!("services.web.check.{name}"), 13);
        assert!(
            err.message.contains("unless scheme = \"https\""),
            "{key}: {}",
            err.message
        );
    }
}

#[test]
fn a_timeout_longer_than_the_interval_is_refused() {
    let text = with_service(
        "web",
        "[services.web.check]\ninterval = \"2s\"\ntimeout = \"3s\"\n",
    );
    let err = error_at(&text, "services.web.check.timeout", 12);
    assert_eq!(
        err.message,
        "expected a timeout no longer than the interval (2s), got 3s"
    );
}

#[test]
fn out_of_range_check_values_are_refused_with_their_position() {
    let cases = [
        ("type = \"udp\"", "type", "\"tcp\", \"http\" or \"none\""),
        ("target = \"localhost:80\"", "target", "127.0.0.1:8443"),
        ("target = \"127.0.0.1:0\"", "target", "port 1-65535"),
        ("interval = \"500ms\"", "interval", "between 1s and 1h"),
        ("interval = \"2h\"", "interval", "between 1s and 1h"),
        ("timeout = \"10ms\"", "timeout", "between 100ms and 1m"),
        ("rise = 0", "rise", "1-100"),
        ("fall = 101", "fall", "1-100"),
    ];
    for (line, key, expected) in cases {
        let text = with_service("web", &format!("[services.web.check]\n{line}\n"));
        let err = error_at(&text, &format!("services.web.check.{key}"), 11);
        assert!(err.message.contains(expected), "{line}: {}", err.message);
    }
    let http = [
        ("path = \"healthz\"", "path"),
        ("path = \"/a b\"", "path"),
        ("expect = \"600\"", "expect"),
        ("expect = \"399-200\"", "expect"),
        ("expect = \"2xx\"", "expect"),
        ("server_name = \"not a name\"", "server_name"),
    ];
    for (line, key) in http {
        let text = with_service(
            "web",
            &format!("[services.web.check]\ntype = \"http\"\nscheme = \"https\"\n{line}\n"),
        );
        let err = error_at(&text, &format!("services.web.check.{key}"), 13);
        assert!(
            err.message.starts_with("expected "),
            "{line}: {}",
            err.message
        );
    }
    let text = with_service(
        "web",
        "[services.web.check]\ntype = \"http\"\nscheme = \"ftp\"\n",
    );
    let err = error_at(&text, "services.web.check.scheme", 12);
    assert!(
        err.message.contains("\"http\" or \"https\""),
        "{}",
        err.message
    );
    let long = format!("path = \"/{}\"", "a".repeat(1024));
    let text = with_service(
        "web",
        &format!("[services.web.check]\ntype = \"http\"\n{long}\n"),
    );
    error_at(&text, "services.web.check.path", 12);
}

#[test]
fn an_http_check_of_a_tls_service_speaks_http_behind_tailscale_and_https_otherwise() {
    let service = "port = 8443\nmode = \"http\"\n[services.web.check]\ntype = \"http\"\n";
    let check = |text: &str| {
        let CheckKind::Http(http) = spec(&ok(text), "web").check.kind else {
            panic!("an http check");
        };
        http.tls
    };
    // tailscaled terminates TLS and proxies to the port in plain HTTP.
    let tailscale = format!(
        "[node]\nname = \"gpu-01\"\n[network]\nprovider = \"tailscale\"\n[services.web]\n{service}"
    );
    assert_eq!(check(&tailscale), None);
    let wireguard = format!("{WG_BASE}[services.web]\n{service}");
    assert_eq!(
        check(&wireguard),
        Some(HttpsCheck {
            skip_verify: false,
            server_name: "localhost".into()
        })
    );
    // An explicit scheme still wins, and TLS keys without it say why they are refused.
    assert!(check(&format!("{tailscale}scheme = \"https\"\n")).is_some());
    let err = error_at(
        &format!("{tailscale}tls_skip_verify = true\n"),
        "services.web.check.tls_skip_verify",
        10,
    );
    assert!(
        err.message.contains("tailscaled terminates TLS"),
        "{}",
        err.message
    );
}

#[test]
fn a_short_interval_alone_shortens_the_default_timeout() {
    let text = with_service("web", "[services.web.check]\ninterval = \"1s\"\n");
    let check = spec(&ok(&text), "web").check;
    assert_eq!(
        (check.interval, check.timeout),
        (Duration::from_secs(1), Duration::from_secs(1))
    );
    let text = with_service("web", "check = { interval = \"1m\" }\n");
    assert_eq!(
        spec(&ok(&text), "web").check.timeout,
        Duration::from_secs(2)
    );
}

#[test]
fn a_check_path_takes_only_url_path_and_query_characters() {
    for good in ["/healthz", "/a/b?x=1&y=%20z", "/~u/!$'()*+,;=:@-._"] {
        let text = with_service(
            "web",
            &format!("[services.web.check]\ntype = \"http\"\npath = \"{good}\"\n"),
        );
        let CheckKind::Http(http) = spec(&ok(&text), "web").check.kind else {
            panic!("an http check");
        };
        assert_eq!(http.path, good);
    }
    for bad in [
        "/a#frag",
        "/<x>",
        "/a`b",
        "/a b",
        "/caf\u{e9}",
        "/a\\\"b",
        "/a\\\\b",
        "/{x}",
        "/a|b",
    ] {
        let text = with_service(
            "web",
            &format!("[services.web.check]\ntype = \"http\"\npath = \"{bad}\"\n"),
        );
        let err = error_at(&text, "services.web.check.path", 12);
        assert!(
            err.message.contains("percent-encode"),
            "{bad}: {}",
            err.message
        );
    }
}

#[test]
fn xid_list_and_hold_are_read_and_checked() {
    let config = ok(&format!(
        "{WG_BASE}[gpu]\nunhealthy_xids = [79, 48, 79]\nxid_hold = \"3s\"\n"
    ));
    assert_eq!(
        config
            .gpu
            .unhealthy_xids
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        [48, 79]
    );
    assert_eq!(config.gpu.xid_hold, Duration::from_secs(3));
    let none = ok(&format!("{WG_BASE}[gpu]\nunhealthy_xids = []\n"));
    assert!(none.gpu.unhealthy_xids.is_empty());
    let err = error_at(
        &format!("{WG_BASE}[gpu]\nunhealthy_xids = [79, -1]\n"),
        "gpu.unhealthy_xids[1]",
        8,
    );
    assert_eq!(err.message, "expected an XID code 1-65535, got -1");
    let err = error_at(
        &format!("{WG_BASE}[gpu]\nxid_hold = \"31d\"\n"),
        "gpu.xid_hold",
        8,
    );
    assert!(
        err.message.contains("between 1s and 30days"),
        "{}",
        err.message
    );
}

#[test]
fn tailscale_services_take_the_same_check_keys() {
    let text = "[node]\nname = \"gpu-01\"\n[network]\nprovider = \"tailscale\"\n[network.tailscale.services.web]\nport = 8080\nmode = \"tcp\"\n[network.tailscale.services.web.check]\ntype = \"none\"\n";
    assert_eq!(spec(&ok(text), "web").check.kind, CheckKind::None);
}

#[test]
fn the_same_service_in_both_tables_must_agree_on_its_check() {
    let text = "[node]\nname = \"gpu-01\"\n[network]\nprovider = \"tailscale\"\n[services.web]\nport = 8080\nmode = \"tcp\"\n[network.tailscale.services.web]\nport = 8080\nmode = \"tcp\"\ncheck = { type = \"none\" }\n";
    let all = errors(text);
    assert_eq!(all.len(), 1, "{all:#?}");
    assert!(
        all[0]
            .message
            .contains("declared twice with different settings"),
        "{}",
        all[0]
    );
}

#[test]
fn a_gateway_checks_its_own_listener() {
    let config = ok(&format!(
        "{WG_BASE}[gateway]\nenabled = true\nlisten = \"0.0.0.0:8444\"\n"
    ));
    let gateway = spec(&config, "gateway");
    assert_eq!(
        gateway.check.kind,
        CheckKind::Tcp {
            target: "127.0.0.1:8444".parse().unwrap()
        }
    );
    assert!(!gateway.requires_gpus);
}

#[test]
fn summary_shows_each_services_check_and_the_xid_rule() {
    let config = ok(&with_service(
        "molt-provider",
        "[services.molt-provider.check]\ninterval = \"1s\"\ntimeout = \"1s\"\n",
    ));
    let summary = config.summary();
    assert!(
        summary.contains(
            "  molt-provider 8443/tcp, check tcp 127.0.0.1:8443 every 1s (timeout 1s, rise 2, fall 3), requires GPUs\n"
        ),
        "{summary}"
    );
    assert!(
        summary.contains("  unusable for 1h after XID 48, 63, 64, 74, 79, 94, 95, 119, 120\n"),
        "{summary}"
    );
}

const ETCD_GW: &str = "[gateway]\nenabled = true\nstore = \"etcd\"\n";

#[cfg(feature = "store-etcd")]
#[test]
fn an_etcd_store_takes_its_endpoints_prefix_and_tls_files() {
    let config = ok(&format!(
        "{WG_BASE}{ETCD_GW}etcd_endpoints = [\"https://10.0.0.1:2379\", \"https://10.0.0.2:2379\"]\netcd_ca_file = \"/etc/etcd/ca.pem\"\netcd_cert_file = \"/etc/etcd/c.pem\"\netcd_key_file = \"/etc/etcd/c.key\"\n"
    ));
    let GatewayStore::Etcd(etcd) = &config.gateway.store else {
        panic!("etcd expected: {:?}", config.gateway.store);
    };
    assert_eq!(etcd.endpoints.len(), 2);
    assert_eq!(etcd.prefix, "/clawbernetes/");
    assert_eq!(etcd.ca_file.as_deref(), Some(Path::new("/etc/etcd/ca.pem")));
    assert!(config.summary().contains("store etcd https://10.0.0.1:2379,https://10.0.0.2:2379 under /clawbernetes/, client certificate"));
    let plain = ok(&format!(
        "{WG_BASE}{ETCD_GW}etcd_endpoints = [\"http://127.0.0.1:2379\"]\netcd_prefix = \"/mesh/a/\"\n"
    ));
    let GatewayStore::Etcd(etcd) = &plain.gateway.store else {
        panic!("etcd expected");
    };
    assert_eq!(etcd.prefix, "/mesh/a/");
    assert_eq!(etcd.ca_file, None);
}

#[cfg(feature = "store-etcd")]
#[test]
fn an_etcd_store_without_endpoints_a_ca_for_https_or_with_a_bad_prefix_is_refused() {
    let e = error_at(&format!("{WG_BASE}{ETCD_GW}"), "gateway.etcd_endpoints", 7);
    assert!(e.message.contains("needs etcd_endpoints"), "{e}");
    let e = error_at(
        &format!("{WG_BASE}{ETCD_GW}etcd_endpoints = [\"https://10.0.0.1:2379\"]\n"),
        "gateway.etcd_ca_file",
        7,
    );
    assert!(e.message.contains("need etcd_ca_file"), "{e}");
    let e = error_at(
        &format!("{WG_BASE}{ETCD_GW}etcd_endpoints = [\"10.0.0.1:2379\"]\n"),
        "gateway.etcd_endpoints",
        10,
    );
    assert!(e.message.contains("http:// or https://"), "{e}");
    let e = error_at(
        &format!(
            "{WG_BASE}{ETCD_GW}etcd_endpoints = [\"http://a:2379\"]\netcd_prefix = \"clawbernetes\"\n"
        ),
        "gateway.etcd_prefix",
        11,
    );
    assert!(e.message.contains("starting and ending with '/'"), "{e}");
    let e = error_at(
        &format!(
            "{WG_BASE}{ETCD_GW}etcd_endpoints = [\"http://a:2379\"]\netcd_cert_file = \"/c.pem\"\n"
        ),
        "gateway.etcd_cert_file",
        11,
    );
    assert!(e.message.contains("go together"), "{e}");
}

#[test]
fn etcd_keys_with_the_sqlite_store_or_an_unknown_store_are_refused() {
    let e = error_at(
        &format!("{WG_BASE}[gateway]\netcd_endpoints = [\"http://a:2379\"]\n"),
        "gateway.store",
        7,
    );
    assert!(e.message.contains("store is \"sqlite\""), "{e}");
    let e = error_at(
        &format!("{WG_BASE}[gateway]\nstore = \"postgres\"\n"),
        "gateway.store",
        8,
    );
    assert!(e.message.contains("\"sqlite\" or \"etcd\""), "{e}");
}

#[cfg(not(feature = "store-etcd"))]
#[test]
fn a_build_without_etcd_refuses_the_etcd_store_clearly() {
    let e = error_at(
        &format!("{WG_BASE}{ETCD_GW}etcd_endpoints = [\"http://a:2379\"]\n"),
        "gateway.store",
        9,
    );
    assert!(e.message.contains("built without the etcd store"), "{e}");
}
