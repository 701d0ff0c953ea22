//! `clawnode peers [--json]`: the WireGuard peers as the running daemon reads them from the
//! device: endpoint, allowed IPs, last handshake, bytes.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::api::{StatusDoc, client};
use crate::mesh::LiveStatus;

use super::CliError;
use super::status::socket_for;

pub fn run(config_path: &Path, json: bool, socket: Option<&Path>) -> Result<ExitCode, CliError> {
    let socket = socket_for(config_path, socket);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    let reply = runtime
        .block_on(client::get(&socket, "/v1/status", Duration::from_secs(5)))
        .map_err(CliError::runtime)?;
    let doc: StatusDoc = serde_json::from_slice(&reply.body).map_err(CliError::runtime)?;
    let Some(LiveStatus::Wireguard(wg)) = doc.mesh.live else {
        return Err(CliError::runtime(std::io::Error::other(format!(
            "no WireGuard interface is up (provider {}, mesh {})",
            doc.provider, doc.mesh.health.state
        ))));
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&wg).map_err(CliError::runtime)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "interface {} ({}), public key {}, listening on {}, addresses {}",
        wg.interface,
        wg.backend,
        wg.public_key.as_deref().unwrap_or("-"),
        wg.listen_port.map_or("-".into(), |p| p.to_string()),
        wg.addresses.join(", ")
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for p in &wg.peers {
        let handshake = p.last_handshake_unix_ms.map_or("never".to_string(), |t| {
            format!("{} s ago", now.saturating_sub(t) / 1000)
        });
        println!(
            "  {:<16} {:<44} endpoint {:<22} allowed {:<20} handshake {:<10} rx {} tx {}",
            p.name.as_deref().unwrap_or("(unnamed)"),
            p.public_key,
            p.endpoint.as_deref().unwrap_or("-"),
            p.allowed_ips.join(","),
            handshake,
            p.rx_bytes,
            p.tx_bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}
