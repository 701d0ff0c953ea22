//! Reading a gateway request: a pure function from the request's parts (method, target, two
//! headers, body bytes) to what is asked, or the refusal to send. The handlers call exactly
//! this, and the fuzz target feeds it arbitrary bytes.

use std::time::Duration;

use crate::core::coord::{Advert, Cursor, JoinRequest, Session, check_dns_label};

/// The largest request body read (a join or an advert is far smaller).
pub const MAX_BODY: usize = 64 * 1024;
/// The longest a poll may wait for a change.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// What a request asks for, checked.
#[derive(Debug)]
pub enum Request {
    Join(JoinRequest),
    Peers {
        session: Session,
        cursor: Option<Cursor>,
        wait: Duration,
        gzip: bool,
    },
    PutSelf {
        session: Session,
        advert: Advert,
    },
    Services {
        session: Session,
        name: String,
    },
    Status {
        session: Session,
    },
}

/// A request refused before it reached the view or the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub error: String,
    pub retry: bool,
}

fn refuse(status: u16, error: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error: error.into(),
        retry: false,
    }
}

/// The parts of a request the gateway reads.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    pub method: &'a str,
    /// Path and query, as on the request line.
    pub target: &'a str,
    pub authorization: Option<&'a [u8]>,
    pub accept_encoding: Option<&'a [u8]>,
    pub body: &'a [u8],
    /// The address the request came from: it fills an advert's unspecified endpoints.
    pub source: std::net::IpAddr,
}

/// Parse one request. Never panics, whatever the bytes.
pub fn parse(parts: Parts<'_>) -> Result<Request, Refusal> {
    if parts.body.len() > MAX_BODY {
        return Err(refuse(413, "request body over 64 KiB"));
    }
    let (path, query) = match parts.target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (parts.target, None),
    };
    match (parts.method, path) {
        ("POST", "/v1/join") => parse_join(parts.body).map(Request::Join),
        ("GET", "/v1/peers") => {
            let session = bearer(parts.authorization)?;
            let (cursor, wait) = peers_query(query.unwrap_or(""))?;
            Ok(Request::Peers {
                session,
                cursor,
                wait,
                gzip: accepts_gzip(parts.accept_encoding),
            })
        }
        ("PUT", "/v1/self") => {
            let session = bearer(parts.authorization)?;
            let advert = parse_advert(parts.body, parts.source)?;
            if advert.node_id != session.node_id {
                return Err(refuse(
                    403,
                    "an advert may only be for the session's own node",
                ));
            }
            Ok(Request::PutSelf { session, advert })
        }
        ("GET", "/v1/status") => Ok(Request::Status {
            session: bearer(parts.authorization)?,
        }),
        ("GET", p) if p.starts_with("/v1/services/") => {
            let session = bearer(parts.authorization)?;
            let name = &p["/v1/services/".len()..];
            check_dns_label(name).map_err(|e| refuse(400, format!("service name: {e}")))?;
            Ok(Request::Services {
                session,
                name: name.to_owned(),
            })
        }
        (_, "/v1/join" | "/v1/peers" | "/v1/self" | "/v1/status") => {
            Err(refuse(405, "method not allowed"))
        }
        _ => Err(refuse(404, "no such endpoint")),
    }
}

/// `POST /v1/join`'s body: a JSON `JoinRequest` with a DNS-label name and a WireGuard key.
pub fn parse_join(body: &[u8]) -> Result<JoinRequest, Refusal> {
    let request: JoinRequest = serde_json::from_slice(body)
        .map_err(|e| refuse(400, format!("not a join request: {e}")))?;
    check_dns_label(&request.name).map_err(|e| refuse(400, format!("name: {e}")))?;
    if request.endpoints.len() > crate::core::coord::record::MAX_ENDPOINTS {
        return Err(refuse(400, "too many endpoints"));
    }
    Ok(request)
}

/// `PUT /v1/self`'s body: a JSON `Advert` within the record limits, checked once `source`
/// has filled its unspecified endpoints (`0.0.0.0:51820` is allowed there).
pub fn parse_advert(body: &[u8], source: std::net::IpAddr) -> Result<Advert, Refusal> {
    let mut advert: Advert =
        serde_json::from_slice(body).map_err(|e| refuse(400, format!("not an advert: {e}")))?;
    if advert.endpoints.len() > crate::core::coord::record::MAX_ENDPOINTS {
        return Err(refuse(400, "too many endpoints"));
    }
    super::server::fill_source(&mut advert.endpoints, source);
    advert
        .check()
        .map_err(|e| refuse(400, format!("advert: {e}")))?;
    Ok(advert)
}

/// `Authorization: Bearer <node id>.<secret>`.
pub fn bearer(header: Option<&[u8]>) -> Result<Session, Refusal> {
    let unauthorised = || refuse(401, "missing or malformed session (Authorization: Bearer)");
    let text = std::str::from_utf8(header.ok_or_else(unauthorised)?).map_err(|_| unauthorised())?;
    let token = text.strip_prefix("Bearer ").ok_or_else(unauthorised)?;
    token.trim().parse().map_err(|_| unauthorised())
}

/// `cursor=<c>&wait=<secs>`: a cursor that does not parse is no cursor (a snapshot follows);
/// `wait` above 30 s is cut to 30 s.
pub fn peers_query(query: &str) -> Result<(Option<Cursor>, Duration), Refusal> {
    let mut cursor = None;
    let mut wait = Duration::ZERO;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "cursor" => cursor = value.parse().ok(),
            "wait" => {
                let secs: u64 = value
                    .parse()
                    .map_err(|_| refuse(400, "wait: expected whole seconds 0-30"))?;
                wait = Duration::from_secs(secs).min(MAX_WAIT);
            }
            _ => {}
        }
    }
    Ok((cursor, wait))
}

/// Whether `Accept-Encoding` lists gzip (not with q=0).
pub fn accepts_gzip(header: Option<&[u8]>) -> bool {
    let Some(text) = header.and_then(|h| std::str::from_utf8(h).ok()) else {
        return false;
    };
    text.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        parts.next().is_some_and(|c| c.eq_ignore_ascii_case("gzip"))
            && parts.all(|p| p.replace(' ', "") != "q=0")
    })
}

/// The fuzz target's body (for `src/fuzzing.rs`): the first byte picks the method, the rest is
/// `target \n authorization \n accept-encoding \n body`. Panics when a property fails.
pub fn fuzz_request(data: &[u8]) {
    const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let mut pieces = rest.splitn(4, |&b| b == b'\n');
    let target = String::from_utf8_lossy(pieces.next().unwrap_or_default());
    let authorization = pieces.next();
    let accept_encoding = pieces.next();
    let body = pieces.next().unwrap_or_default();
    let parsed = parse(Parts {
        method: METHODS[usize::from(pick) % METHODS.len()],
        target: &target,
        authorization,
        accept_encoding,
        body,
        source: std::net::IpAddr::from([198, 51, 100, 1]),
    });
    match parsed {
        Ok(Request::Peers { wait, .. }) => assert!(wait <= MAX_WAIT),
        Ok(Request::PutSelf { session, advert }) => {
            assert_eq!(advert.node_id, session.node_id);
            assert!(advert.check().is_ok());
        }
        Ok(Request::Join(join)) => assert!(check_dns_label(&join.name).is_ok()),
        Ok(Request::Services { name, .. }) => assert!(check_dns_label(&name).is_ok()),
        Ok(Request::Status { .. }) => {}
        Err(refusal) => {
            assert!((400..500).contains(&refusal.status), "{refusal:?}");
            assert!(!refusal.retry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzz_body_holds_on_a_few_hand_made_requests() {
        let session = b"Bearer n7.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let mut poll = vec![0u8];
        poll.extend_from_slice(b"/v1/peers?cursor=0000000000000001.5&wait=99\n");
        poll.extend_from_slice(session);
        poll.extend_from_slice(b"\ngzip\n");
        fuzz_request(&poll);
        let mut advert = vec![2u8];
        advert.extend_from_slice(b"/v1/self\n");
        advert.extend_from_slice(session);
        advert.extend_from_slice(
            b"\n\n{\"node_id\":\"n8\",\"seq\":1,\"endpoints\":[],\"services\":[],\"gpus\":null}",
        );
        fuzz_request(&advert);
        fuzz_request(b"\x01/v1/join\n\n\n{\"name\":");
        fuzz_request(&[]);
        fuzz_request(b"\xff\xff\n\n\n");
    }

    #[test]
    fn an_advert_for_another_node_is_refused() {
        let refusal = parse(Parts {
            method: "PUT",
            target: "/v1/self",
            authorization: Some(SESSION.as_bytes()),
            accept_encoding: None,
            body: br#"{"node_id":"n8","seq":1,"endpoints":[],"services":[],"gpus":null}"#,
            source: std::net::IpAddr::from([198, 51, 100, 1]),
        })
        .unwrap_err();
        assert_eq!(refusal.status, 403);
    }

    fn get(target: &str, auth: Option<&str>) -> Result<Request, Refusal> {
        parse(Parts {
            method: "GET",
            target,
            authorization: auth.map(str::as_bytes),
            accept_encoding: Some(b"gzip, deflate"),
            body: b"",
            source: std::net::IpAddr::from([198, 51, 100, 1]),
        })
    }

    const SESSION: &str = "Bearer n7.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    #[test]
    fn a_poll_without_a_session_is_refused_with_401() {
        let refusal = get("/v1/peers?wait=25", None).unwrap_err();
        assert_eq!(refusal.status, 401);
    }

    #[test]
    fn a_poll_reads_cursor_and_wait_and_caps_the_wait_at_30_seconds() {
        let cursor = Cursor {
            store_id: 0xab,
            rev: 9,
        };
        let Ok(Request::Peers {
            session,
            cursor: got,
            wait,
            gzip,
        }) = get(
            &format!("/v1/peers?cursor={cursor}&wait=300"),
            Some(SESSION),
        )
        else {
            panic!("a poll");
        };
        assert_eq!(session.node_id.0, 7);
        assert_eq!(got, Some(cursor));
        assert_eq!(wait, MAX_WAIT);
        assert!(gzip);
    }

    #[test]
    fn a_garbled_cursor_means_a_snapshot_not_an_error() {
        let Ok(Request::Peers { cursor, .. }) = get("/v1/peers?cursor=zzz", Some(SESSION)) else {
            panic!("a poll");
        };
        assert_eq!(cursor, None);
    }

    #[test]
    fn unknown_paths_and_methods_are_404_and_405() {
        assert_eq!(get("/v2/x", Some(SESSION)).unwrap_err().status, 404);
        assert_eq!(get("/v1/join", None).unwrap_err().status, 405);
    }

    #[test]
    fn a_service_name_must_be_a_dns_label() {
        assert_eq!(
            get("/v1/services/../etc", Some(SESSION))
                .unwrap_err()
                .status,
            400
        );
        assert!(matches!(
            get("/v1/services/gateway", Some(SESSION)),
            Ok(Request::Services { .. })
        ));
    }

    #[test]
    fn gzip_is_used_only_when_accepted() {
        assert!(accepts_gzip(Some(b"br, gzip;q=0.5")));
        assert!(!accepts_gzip(Some(b"gzip;q=0")));
        assert!(!accepts_gzip(None));
    }
}
