//! The LocalAPI client against the strict stand-in tailscaled.

use std::time::Duration;

use crate::support::tailscaled::{StandIn, etag};
use bytes::Bytes;
use clawnode::mesh::tailscale::localapi::{LocalApi, LocalApiError, Version};
use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};
use serde_json::{Value, json};

fn standin(version: &str) -> (tempfile::TempDir, StandIn) {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(&dir.path().join("tailscaled.sock"), version);
    (dir, standin)
}

#[tokio::test]
async fn status_works_with_the_host_header_tailscaled_demands_and_reports_the_version() {
    let (_dir, ts) = standin("1.102.2-t0a29cf18b-g3f044c9f6");
    let api = LocalApi::new(&ts.socket);
    let reply = api.get("/localapi/v0/status?peers=false").await.unwrap();
    assert_eq!(reply.version, Some(Version::new(1, 102, 2)));
    let status: Value = reply.json("status").unwrap();
    assert_eq!(status["BackendState"], "NeedsLogin");

    // What hyperlocal sends by itself (Host: <hex socket path>:0) is refused, as by tailscaled.
    let raw: Client<UnixConnector, Full<Bytes>> = Client::unix();
    let uri: hyper::Uri = hyperlocal::Uri::new(&ts.socket, "/localapi/v0/status").into();
    let resp = raw.get(uri).await.unwrap();
    assert_eq!(resp.status(), 403);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"invalid localapi request\n");
}

#[tokio::test]
async fn a_request_with_an_origin_header_is_refused() {
    let (_dir, ts) = standin("1.102.2");
    let raw: Client<UnixConnector, Full<Bytes>> = Client::unix();
    let uri: hyper::Uri = hyperlocal::Uri::new(&ts.socket, "/localapi/v0/status").into();
    let req = hyper::Request::get(uri)
        .header("Host", "local-tailscaled.sock")
        .header("Origin", "http://evil.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(raw.request(req).await.unwrap().status(), 403);
}

#[tokio::test]
async fn serve_config_etag_is_checked_and_a_stale_one_is_a_412() {
    let (_dir, ts) = standin("1.102.2");
    let api = LocalApi::new(&ts.socket);
    let reply = api.get("/localapi/v0/serve-config").await.unwrap();
    assert_eq!(
        reply.etag.as_deref(),
        Some("74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b"),
        "sha256 of null"
    );
    let stale = reply.etag.clone().unwrap();
    let config = json!({ "TCP": { "9050": { "TCPForward": "tor:9050" } } });
    let body = serde_json::to_vec(&config).unwrap();
    api.call(
        Method::POST,
        "/localapi/v0/serve-config",
        Some(body.clone()),
        Some(&stale),
    )
    .await
    .unwrap();
    assert_eq!(ts.with(|s| s.serve_etag()), etag(&config));
    let err = api
        .call(
            Method::POST,
            "/localapi/v0/serve-config",
            Some(body),
            Some(&stale),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, LocalApiError::EtagMismatch { .. }), "{err}");
}

#[tokio::test]
async fn the_three_error_formats_reach_the_caller_as_messages() {
    let (_dir, ts) = standin("1.102.2");
    let api = LocalApi::new(&ts.socket);
    let err = api
        .call(
            Method::PATCH,
            "/localapi/v0/prefs",
            Some(br#"{"Hostname":"bad_name","HostnameSet":true}"#.to_vec()),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LocalApiError::Status { status: 400, message, .. } if message == "invalid hostname \"bad_name\""),
        "{err}"
    );
    let err = api
        .call(
            Method::POST,
            "/localapi/v0/serve-config",
            Some(b"{not json".to_vec()),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LocalApiError::Status { status: 500, message, .. } if message.starts_with("decoding config")),
        "{err}"
    );
    let err = api.get("/localapi/v0/no-such-thing").await.unwrap_err();
    assert!(
        matches!(&err, LocalApiError::NotFound { message, .. } if message == "404 page not found"),
        "{err}"
    );
}

#[tokio::test]
async fn an_1_86_daemon_has_no_services_endpoint() {
    let (_dir, ts) = standin("1.86.2");
    let api = LocalApi::new(&ts.socket);
    let err = api.get("/localapi/v0/services").await.unwrap_err();
    assert!(matches!(err, LocalApiError::NotFound { .. }));
    let (_dir2, new) = standin("1.98.0");
    assert!(
        LocalApi::new(&new.socket)
            .get("/localapi/v0/services")
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn the_bus_streams_integer_states_as_ndjson() {
    let (_dir, ts) = standin("1.102.2");
    let api = LocalApi::new(&ts.socket);
    let mut body = api.watch_bus(2).await.unwrap();
    let mut buffer = Vec::new();
    let mut lines = Vec::new();
    api.call(Method::POST, "/localapi/v0/login-interactive", None, None)
        .await
        .unwrap();
    while lines.len() < 2 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("bus message")
            .unwrap()
            .unwrap();
        buffer.extend_from_slice(frame.data_ref().unwrap());
        while let Some(pos) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=pos).collect();
            lines.push(serde_json::from_slice::<Value>(&line).unwrap());
        }
    }
    assert_eq!(lines[0]["State"], 2, "NeedsLogin as an integer");
    assert_eq!(lines[1]["State"], 6, "Running after login");
}

#[tokio::test]
async fn a_missing_daemon_is_reported_as_unreachable_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let api = LocalApi::new(&dir.path().join("none.sock"));
    let err = api.get("/localapi/v0/status").await.unwrap_err();
    assert!(matches!(err, LocalApiError::Unreachable { .. }), "{err}");
}

/// One request as any LocalAPI client sends it: (status, body).
async fn raw(ts: &StandIn, method: Method, path: &str, body: &str) -> (u16, String) {
    let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
    let uri: hyper::Uri = hyperlocal::Uri::new(&ts.socket, path).into();
    let req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("Host", "local-tailscaled.sock")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

const SET_40000: &str = r#"{"RelayServerPort":40000,"RelayServerPortSet":true}"#;

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap()
}

/// A UDP port nothing holds right now.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn an_old_tailscaled_ignores_the_relay_port_and_answers_prefs_without_it() {
    let (_dir, ts) = standin("1.80.3");
    let (status, body) = raw(&ts, Method::PATCH, "/localapi/v0/prefs", SET_40000).await;
    assert_eq!(status, 200, "{body}");
    let answered = json_of(&body);
    assert!(answered.get("RelayServerPort").is_none(), "{answered}");
    assert_eq!(answered["OperatorUser"], "alex", "the rest of the prefs");
    let (_, body) = raw(&ts, Method::GET, "/localapi/v0/prefs", "").await;
    assert!(json_of(&body).get("RelayServerPort").is_none());
    // Even a value of the wrong type is skipped: the field is unknown to this daemon.
    let (status, _) = raw(
        &ts,
        Method::PATCH,
        "/localapi/v0/prefs",
        r#"{"RelayServerPort":"x","RelayServerPortSet":true}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ts.with(|s| s.prefs_patches.len()), 2);
    assert_eq!(ts.with(|s| s.prefs_patches[0].clone()), json_of(SET_40000));
    assert_eq!(ts.with(|s| s.relay_bound_port()), None);
}

#[tokio::test]
async fn a_relay_port_of_the_wrong_type_gets_go_s_decode_error() {
    let cases = [
        (
            "1.86.2",
            r#""40000""#,
            Some("string into Go struct field MaskedPrefs.RelayServerPort of type int"),
        ),
        (
            "1.86.2",
            "true",
            Some("bool into Go struct field MaskedPrefs.RelayServerPort of type int"),
        ),
        (
            "1.86.2",
            "1.5",
            Some("number 1.5 into Go struct field MaskedPrefs.RelayServerPort of type int"),
        ),
        // Before 1.92 the pref is an *int: any integer decodes.
        ("1.86.2", "70000", None),
        (
            "1.92.0",
            r#""40000""#,
            Some("string into Go struct field MaskedPrefs.RelayServerPort of type uint16"),
        ),
        (
            "1.92.0",
            "{}",
            Some("object into Go struct field MaskedPrefs.RelayServerPort of type uint16"),
        ),
        (
            "1.92.0",
            "70000",
            Some("number 70000 into Go struct field MaskedPrefs.RelayServerPort of type uint16"),
        ),
        (
            "1.92.0",
            "-1",
            Some("number -1 into Go struct field MaskedPrefs.RelayServerPort of type uint16"),
        ),
        ("1.102.2", "65535", None),
    ];
    for (version, value, error) in cases {
        let (_dir, ts) = standin(version);
        let body = format!(r#"{{"RelayServerPort":{value},"RelayServerPortSet":true}}"#);
        let (status, answer) = raw(&ts, Method::PATCH, "/localapi/v0/prefs", &body).await;
        match error {
            Some(error) => {
                assert_eq!(status, 400, "{version} {value}: {answer}");
                assert_eq!(answer, format!("json: cannot unmarshal {error}\n"));
                let prefs = ts.with(|s| s.prefs.clone());
                assert!(prefs.get("RelayServerPort").is_none(), "nothing applied");
            }
            None => {
                assert_eq!(status, 200, "{version} {value}: {answer}");
                assert_eq!(json_of(&answer)["RelayServerPort"], json_of(value));
            }
        }
    }
}

#[tokio::test]
async fn status_without_peers_has_a_null_peer_map_and_with_them_the_one_a_test_sets() {
    let (_dir, ts) = standin("1.102.2");
    // No netmap before login: no peers at all.
    let (_, body) = raw(&ts, Method::GET, "/localapi/v0/status", "").await;
    assert_eq!(json_of(&body)["Peer"], Value::Null);
    ts.with(|s| s.set_state("Running"));
    let (_, body) = raw(&ts, Method::GET, "/localapi/v0/status?peers=false", "").await;
    let status = json_of(&body);
    // tailscaled's StatusWithoutPeers leaves the map nil, and it is not omitempty.
    assert_eq!(status.get("Peer"), Some(&Value::Null), "{status}");
    assert_eq!(status["BackendState"], "Running");
    let (_, body) = raw(&ts, Method::GET, "/localapi/v0/status?peers=true", "").await;
    assert_eq!(json_of(&body)["Peer"].as_object().map(|m| m.len()), Some(3));

    let mixed: Value =
        serde_json::from_str(crate::support::tailscaled::MIXED_PATHS_FIXTURE).unwrap();
    ts.with(|s| s.peer_map = mixed["Peer"].clone());
    let (_, body) = raw(&ts, Method::GET, "/localapi/v0/status", "").await;
    let peers = json_of(&body)["Peer"].clone();
    assert_eq!(peers.as_object().map(|m| m.len()), Some(15));
    assert_eq!(peers, mixed["Peer"]);
}

#[tokio::test]
async fn a_set_relay_port_is_bound_on_all_interfaces_until_cleared_and_survives_a_restart() {
    let (_dir, mut ts) = standin("1.92.0");
    let port = free_udp_port();
    let set = format!(r#"{{"RelayServerPort":{port},"RelayServerPortSet":true}}"#);
    let (status, body) = raw(&ts, Method::PATCH, "/localapi/v0/prefs", &set).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["RelayServerPort"], port);
    assert_eq!(ts.with(|s| s.relay_bound_port()), Some(port));
    assert!(
        std::net::UdpSocket::bind(("0.0.0.0", port)).is_err(),
        "the port is held on all interfaces"
    );

    // tailscaled keeps its prefs across a restart and binds again.
    ts.stop();
    assert_eq!(ts.with(|s| s.relay_bound_port()), None);
    ts.start_again();
    assert_eq!(ts.with(|s| s.relay_bound_port()), Some(port));

    // `tailscale set --relay-server-port=` sends null: the pref is gone (omitempty).
    let clear = r#"{"RelayServerPort":null,"RelayServerPortSet":true}"#;
    let (status, body) = raw(&ts, Method::PATCH, "/localapi/v0/prefs", clear).await;
    assert_eq!(status, 200);
    assert!(json_of(&body).get("RelayServerPort").is_none(), "{body}");
    assert_eq!(ts.with(|s| s.relay_bound_port()), None);

    // Port 0: the kernel picks one; the pref stays 0.
    let zero = r#"{"RelayServerPort":0,"RelayServerPortSet":true}"#;
    let (_, body) = raw(&ts, Method::PATCH, "/localapi/v0/prefs", zero).await;
    assert_eq!(json_of(&body)["RelayServerPort"], 0);
    assert!(ts.with(|s| s.relay_bound_port()).is_some_and(|p| p != 0));

    // A lost state file loses the pref, and the relay with it; the login survives.
    ts.with(|s| s.set_state("Running"));
    ts.restart_losing_prefs();
    assert_eq!(ts.with(|s| s.relay_bound_port()), None);
    let (_, body) = raw(&ts, Method::GET, "/localapi/v0/prefs", "").await;
    assert!(json_of(&body).get("RelayServerPort").is_none());
    assert_eq!(ts.with(|s| s.backend_state.clone()), "Running");
    assert_eq!(ts.with(|s| s.prefs_patches.len()), 3);
}

#[tokio::test]
async fn a_1_86_daemon_binds_the_relay_port_only_when_a_peer_first_asks() {
    let (_dir, ts) = standin("1.86.2");
    let port = free_udp_port();
    let set = format!(r#"{{"RelayServerPort":{port},"RelayServerPortSet":true}}"#);
    let (status, body) = raw(&ts, Method::PATCH, "/localapi/v0/prefs", &set).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["RelayServerPort"], port, "the pref is kept");
    assert_eq!(ts.with(|s| s.relay_bound_port()), None, "lazy before 1.90");
    ts.with(|s| s.peer_asks_for_relay_endpoint());
    assert_eq!(ts.with(|s| s.relay_bound_port()), Some(port));
}

#[tokio::test]
async fn a_relay_port_in_use_is_kept_as_a_pref_and_the_bind_error_is_exposed() {
    let (_dir, ts) = standin("1.102.2");
    let holder = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let set = format!(r#"{{"RelayServerPort":{port},"RelayServerPortSet":true}}"#);
    let (status, body) = raw(&ts, Method::PATCH, "/localapi/v0/prefs", &set).await;
    assert_eq!(status, 200, "tailscaled logs the failure and carries on");
    assert_eq!(json_of(&body)["RelayServerPort"], port);
    assert_eq!(ts.with(|s| s.relay_bound_port()), None);
    assert!(ts.with(|s| s.relay_bind_error.clone()).is_some());
    // Freed, the next prefs change binds it.
    drop(holder);
    let (status, _) = raw(&ts, Method::PATCH, "/localapi/v0/prefs", &set).await;
    assert_eq!(status, 200);
    assert_eq!(ts.with(|s| s.relay_bound_port()), Some(port));
    assert_eq!(ts.with(|s| s.relay_bind_error.clone()), None);
}
