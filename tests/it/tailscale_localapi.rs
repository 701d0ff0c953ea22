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
