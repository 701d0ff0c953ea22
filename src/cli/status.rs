//! `clawnode status`: asks the running daemon over its Unix socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::mesh::LiveStatus;
use crate::mesh::live::TsStatus;

use clap::{Args, ValueEnum};

use crate::api::{self, StatusDoc, client};
use crate::config;

use super::CliError;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the daemon's status document as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print nothing on success; exit 0 if the daemon is live/ready, 1 if not.
    #[arg(long, value_enum, value_name = "WHAT")]
    pub check: Option<Check>,
    /// The daemon's API socket (default: [api] socket from the config, else /run/clawbernetes/clawnode.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Check {
    Live,
    Ready,
}

/// The daemon's socket: `--socket`, else `[api] socket` from the config, else the default.
pub fn socket_for(config_path: &Path, socket: Option<&Path>) -> PathBuf {
    if let Some(socket) = socket {
        return socket.to_path_buf();
    }
    // An unreadable config (it is 0600 root) should not stop a status query.
    config::load(config_path)
        .map(|c| c.api.socket)
        .unwrap_or_else(|_| PathBuf::from(api::DEFAULT_SOCKET))
}

pub fn run(config_path: &Path, args: &StatusArgs) -> Result<ExitCode, CliError> {
    let socket = socket_for(config_path, args.socket.as_deref());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    runtime.block_on(async {
        if let Some(check) = args.check {
            return Ok(self::check(&socket, check).await);
        }
        let reply = client::get(&socket, "/v1/status", TIMEOUT)
            .await
            .map_err(CliError::runtime)?;
        if args.json {
            println!("{}", String::from_utf8_lossy(&reply.body).trim_end());
            return Ok(ExitCode::SUCCESS);
        }
        let doc: StatusDoc = serde_json::from_slice(&reply.body).map_err(CliError::runtime)?;
        print!("{}", human(&doc, unix_ms_now()));
        Ok(ExitCode::SUCCESS)
    })
}

async fn check(socket: &Path, check: Check) -> ExitCode {
    let path = match check {
        Check::Live => "/v1/health/live",
        Check::Ready => "/v1/health/ready",
    };
    match client::get(socket, path, TIMEOUT).await {
        Ok(reply) if reply.status == 200 => ExitCode::SUCCESS,
        Ok(reply) => {
            eprintln!("{}", String::from_utf8_lossy(&reply.body).trim_end());
            ExitCode::from(crate::exit::FAILURE)
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(crate::exit::FAILURE)
        }
    }
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn human(doc: &StatusDoc, now_unix_ms: u64) -> String {
    let mut out = format!(
        "clawnode {} on {} (pid {})\n",
        doc.version, doc.node, doc.pid
    );
    let row = |out: &mut String, label: &str, value: &str| {
        out.push_str(&format!("{label:<11}{value}\n"));
    };
    row(
        &mut out,
        "phase:",
        &format!("{}{}", doc.phase, if doc.ready { " (ready)" } else { "" }),
    );
    row(&mut out, "status:", &doc.status);
    let health = |h: &api::ComponentDoc| match (&h.summary, &h.error) {
        (_, Some(error)) if h.waiting_for_operator => format!("waiting for operator: {error}"),
        (_, Some(error)) => format!("{}: {error} (attempt {})", h.state, h.attempts),
        (Some(summary), None) => format!("{}: {summary}", h.state),
        (None, None) => h.state.clone(),
    };
    row(
        &mut out,
        "mesh:",
        &format!("{} [{} peers]", health(&doc.mesh.health), doc.mesh.peers),
    );
    if let Some(LiveStatus::Wireguard(wg)) = &doc.mesh.live {
        row(
            &mut out,
            "wireguard:",
            &format!(
                "{} ({}), key {}, port {}, {} peers",
                wg.interface,
                wg.backend,
                wg.public_key.as_deref().unwrap_or("-"),
                wg.listen_port.map_or("-".into(), |p| p.to_string()),
                wg.peers.len()
            ),
        );
        if let Some(gw) = &wg.gateway {
            // While none answers, which one is tried next (failover) says more than the last.
            let trying = match &gw.current {
                Some(current) if gw.url.as_ref() != Some(current) => {
                    format!(", trying {current}")
                }
                _ => String::new(),
            };
            row(
                &mut out,
                "gateway:",
                &format!(
                    "{} via {}, cursor {} ({}s old), {} peers, {} gateways known{trying}",
                    gw.state,
                    gw.url.as_deref().unwrap_or("-"),
                    gw.cursor.as_deref().unwrap_or("-"),
                    gw.cursor_age_s.map_or("-".into(), |a| a.to_string()),
                    gw.peers,
                    gw.gateways.len(),
                ),
            );
        }
    }
    if let Some(LiveStatus::Tailscale(ts)) = &doc.mesh.live {
        tailscale_rows(&mut out, ts, row);
    }
    for problem in &doc.mesh.problems {
        row(&mut out, "problem:", problem);
    }
    row(&mut out, "gpu:", &health(&doc.gpu.health));
    let services: Vec<String> = doc
        .services
        .configured
        .iter()
        .map(|s| format!("{} {}/{}", s.name, s.port, s.protocol))
        .collect();
    let services = if services.is_empty() {
        "none configured".to_string()
    } else {
        services.join(", ")
    };
    row(
        &mut out,
        "services:",
        &format!("{} ({})", services, health(&doc.services.health)),
    );
    out.push_str(&service_lines(&doc.services.checks, now_unix_ms));
    if let Some(note) = &doc.config.reload_note {
        row(&mut out, "config:", note);
    }
    for error in doc.last_errors.iter().rev().take(5) {
        row(
            &mut out,
            "error:",
            &format!("[{}] {}", error.source, error.message),
        );
    }
    out
}

/// One line per service: `  molt-provider  unhealthy  connect refused (since 12s)`.
fn service_lines(checks: &[api::ServiceCheckDoc], now_unix_ms: u64) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for check in checks {
        let mut why = match (&check.reason, &check.last_result) {
            (Some(reason), _) if check.state != "healthy" => reason.clone(),
            (_, Some(last)) => last.detail.clone(),
            (_, None) if check.state == "unknown" => "not checked yet".into(),
            (_, None) => check.check.clone(),
        };
        // Healthy but not offered: the mesh is down or the publish failed (see services:).
        if check.state == "healthy" && !check.advertised {
            why.push_str(", not advertised");
        }
        let age = Duration::from_secs(now_unix_ms.saturating_sub(check.since_unix_ms) / 1000);
        out.push_str(&format!(
            "  {:<width$}  {:<9}  {why} (since {})\n",
            check.name,
            check.state,
            humantime::format_duration(age),
        ));
    }
    out
}

fn tailscale_rows(out: &mut String, ts: &TsStatus, row: impl Fn(&mut String, &str, &str)) {
    if let Some(error) = &ts.error {
        row(
            out,
            "tailscale:",
            &format!("cannot read tailscaled: {error}"),
        );
        return;
    }
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    row(
        out,
        "tailscale:",
        &format!(
            "{} {} ({}), tailscaled {}",
            ts.backend_state,
            or_dash(&ts.dns_name),
            if ts.online { "online" } else { "offline" },
            or_dash(&ts.daemon_version)
        ),
    );
    row(out, "ips:", &ts.ips.join(" "));
    row(
        out,
        "tailnet:",
        &format!(
            "{} (MagicDNS {})",
            or_dash(&ts.tailnet),
            or_dash(&ts.magic_dns_suffix)
        ),
    );
    let tags = if ts.tags.is_empty() {
        "none (untagged)".to_string()
    } else {
        ts.tags.join(", ")
    };
    row(out, "tags:", &tags);
    if let Some(owner) = &ts.owner {
        row(
            out,
            "owner:",
            &format!("{} ({})", owner.login_name, owner.display_name),
        );
    }
    for svc in &ts.services {
        let mut line = format!("{} port {}: {}", svc.name, svc.port, svc.state);
        if !svc.vips.is_empty() {
            line.push_str(&format!(", VIPs {}", svc.vips.join(" ")));
        }
        if let Some(reason) = &svc.reason {
            line.push_str(&format!(" ({reason})"));
        }
        if let Some(cert) = &svc.cert {
            line.push_str(&format!("; cert {} {}", cert.domain, cert.state));
        }
        row(out, "service:", &line);
    }
    if let Some(relay) = &ts.relay {
        let mut line = match (relay.state.as_str(), relay.port, relay.wanted) {
            ("serving", Some(0), _) => "serving on a UDP port tailscaled picked".to_string(),
            ("serving", Some(port), _) => format!("serving on UDP {port}"),
            ("pending", _, Some(wanted)) => format!("UDP {wanted} not set yet"),
            (state, _, _) => state.to_string(),
        };
        if let Some(problem) = &relay.problem {
            line.push_str(&format!(" ({problem})"));
        }
        row(out, "relay:", &line);
    }
    if let Some(error) = &ts.paths_error {
        row(out, "paths:", &format!("cannot read the peers: {error}"));
    }
    if let Some(paths) = &ts.paths {
        row(out, "paths:", &paths.summary);
        // A big tailnet could have hundreds; the rest are in `status --json`.
        const SHOWN: usize = 10;
        let hinted: Vec<_> = paths.peers.iter().filter(|p| p.hint.is_some()).collect();
        for peer in hinted.iter().take(SHOWN) {
            let hint = peer.hint.as_deref().unwrap_or_default();
            row(out, "hint:", &format!("{}: {hint}", peer.name));
        }
        if hinted.len() > SHOWN {
            row(
                out,
                "hint:",
                &format!(
                    "and {} more peers on DERP (clawnode status --json)",
                    hinted.len() - SHOWN
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CheckResultDoc, ServiceCheckDoc};

    #[test]
    fn status_shows_how_many_gateways_are_known_and_which_is_tried_while_none_answers() {
        let gw = crate::mesh::live::GatewayDoc {
            url: Some("https://203.0.113.1:443".into()),
            state: "cached".into(),
            cursor: Some("0000000000000007.42".into()),
            cursor_age_s: Some(9),
            peers: 3,
            gateways: vec![
                "https://203.0.113.1:443".into(),
                "https://203.0.113.2:443".into(),
            ],
            current: Some("https://203.0.113.2:443".into()),
            ..Default::default()
        };
        let mut doc = StatusDoc::default();
        doc.mesh.live = Some(LiveStatus::Wireguard(crate::mesh::live::WgStatus {
            backend: "userspace".into(),
            interface: "claw0".into(),
            public_key: None,
            listen_port: None,
            fwmark: None,
            addresses: Vec::new(),
            peers: Vec::new(),
            gateway: Some(gw.clone()),
        }));
        let text = human(&doc, 0);
        assert!(
            text.contains("cached via https://203.0.113.1:443, cursor 0000000000000007.42 (9s old), 3 peers, 2 gateways known, trying https://203.0.113.2:443\n"),
            "{text}"
        );
        if let Some(LiveStatus::Wireguard(wg)) = &mut doc.mesh.live {
            wg.gateway = Some(crate::mesh::live::GatewayDoc {
                state: "live".into(),
                current: gw.url.clone(),
                ..gw
            });
        }
        assert!(human(&doc, 0).contains("3 peers, 2 gateways known\n"));
    }

    #[test]
    fn status_shows_the_path_summary_a_hint_per_peer_on_derp_and_the_relay() {
        let status: crate::mesh::tailscale::types::Status = serde_json::from_str(include_str!(
            "../../tests/fixtures/tailscale/status-mixed-paths.json"
        ))
        .unwrap();
        let ts = TsStatus {
            relay: Some(crate::mesh::live::RelayDoc {
                wanted: Some(40000),
                port: Some(40000),
                state: "serving".into(),
                problem: None,
            }),
            paths: crate::mesh::tailscale::status::paths_doc(&status, true),
            ..TsStatus::default()
        };
        let mut doc = StatusDoc::default();
        doc.mesh.live = Some(LiveStatus::Tailscale(ts));
        let text = human(&doc, 0);
        assert!(
            text.contains("\nrelay:     serving on UDP 40000\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\npaths:     15 peers: 9 direct, 2 peer-relay, 1 DERP fra, 2 idle, 1 offline\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\nhint:      buyer-cgnat: through DERP fra although a peer relay is available"
            ),
            "{text}"
        );
        assert_eq!(text.matches("hint:").count(), 1, "{text}");
        if let Some(LiveStatus::Tailscale(ts)) = &mut doc.mesh.live {
            ts.relay = Some(crate::mesh::live::RelayDoc {
                wanted: Some(40000),
                port: None,
                state: "unsupported".into(),
                problem: Some("tailscaled 1.80.3 cannot serve as a peer relay".into()),
            });
        }
        assert!(human(&doc, 0).contains(
            "\nrelay:     unsupported (tailscaled 1.80.3 cannot serve as a peer relay)\n"
        ));
    }

    #[test]
    fn status_shows_one_line_per_service_with_its_state_reason_and_age() {
        let now = 1_800_000_000_000;
        let mut doc = StatusDoc::default();
        doc.services.checks = vec![
            ServiceCheckDoc {
                name: "molt-provider".into(),
                state: "unhealthy".into(),
                reason: Some("connect refused".into()),
                since_unix_ms: now - 12_400,
                last_result: Some(CheckResultDoc {
                    ok: false,
                    detail: "connect refused".into(),
                    duration_ms: 0,
                    at_unix_ms: now - 1000,
                }),
                ..ServiceCheckDoc::default()
            },
            ServiceCheckDoc {
                name: "gateway".into(),
                state: "healthy".into(),
                advertised: true,
                since_unix_ms: now - 185_000,
                last_result: Some(CheckResultDoc {
                    ok: true,
                    detail: "HTTP 200".into(),
                    duration_ms: 2,
                    at_unix_ms: now - 2000,
                }),
                ..ServiceCheckDoc::default()
            },
            ServiceCheckDoc {
                name: "ssh".into(),
                state: "unknown".into(),
                since_unix_ms: now,
                ..ServiceCheckDoc::default()
            },
            ServiceCheckDoc {
                name: "web".into(),
                state: "healthy".into(),
                advertised: false,
                since_unix_ms: now - 5000,
                last_result: Some(CheckResultDoc {
                    ok: true,
                    detail: "connected".into(),
                    duration_ms: 0,
                    at_unix_ms: now - 1000,
                }),
                ..ServiceCheckDoc::default()
            },
        ];
        let text = human(&doc, now);
        assert!(
            text.contains(
                "\n  molt-provider  unhealthy  connect refused (since 12s)\n  gateway        healthy    HTTP 200 (since 3m 5s)\n  ssh            unknown    not checked yet (since 0s)\n  web            healthy    connected, not advertised (since 5s)\n"
            ),
            "{text}"
        );
    }
}
