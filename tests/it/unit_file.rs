//! The shipped systemd unit, checked offline on the host: its exposure score from
//! `systemd-analyze security --offline=true` must stay at or under 2.0, and the directives
//! other parts of clawnode rely on must be there.

use std::path::Path;
use std::process::Command;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/clawnode.service");

#[test]
fn the_unit_scores_at_most_2_0_in_systemd_analyze_security() {
    let found = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: systemd-analyze is not installed (tests/run-all.sh installs systemd)");
        return;
    }
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(UNIT)
        .env("SYSTEMD_COLORS", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for clawnode.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no score in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    println!("systemd-analyze security exposure: {score}");
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
}

#[test]
fn the_unit_keeps_readiness_reload_and_config_error_semantics() {
    let unit = std::fs::read_to_string(Path::new(UNIT)).unwrap();
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=/usr/bin/clawnode run",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=78",
        "WatchdogSec=30",
        "StateDirectory=clawbernetes",
        "StateDirectoryMode=0700",
        "RuntimeDirectory=clawbernetes wireguard",
        "ConfigurationDirectory=clawbernetes",
        "UMask=0077",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/net/tun rw",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "missing `{line}` in the unit"
        );
    }
}
