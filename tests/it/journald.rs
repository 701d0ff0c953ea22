//! Under systemd, logs go to journald's native socket with structured fields. The real daemon
//! runs in a private mount namespace where /run/systemd/journal is a directory of ours, holding
//! a datagram socket this test reads. Needs root (unshare); skipped otherwise.

#![cfg(feature = "test-fakes")]

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{BIN, fake_config};

#[test]
fn logs_reach_journald_with_structured_fields_when_run_by_systemd() {
    if !nix::unistd::geteuid().is_root() || Command::new("unshare").arg("--help").output().is_err()
    {
        eprintln!("skipped: needs root and unshare(1)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    std::fs::create_dir(&journal).unwrap();
    let receiver = UnixDatagram::bind(journal.join("socket")).unwrap();
    let config = dir.path().join("clawbernetes.toml");
    std::fs::write(&config, fake_config(dir.path(), "", "")).unwrap();

    let script = r#"set -e
mkdir -p /run/systemd/journal
mount --bind "$1" /run/systemd/journal
shift
exec "$@""#;
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&journal)
        .arg(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let mut entries: Vec<Vec<(String, String)>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65536];
    let find = |entries: &[Vec<(String, String)>], message: &str| {
        entries
            .iter()
            .find(|e| field(e, "MESSAGE") == Some(message))
            .cloned()
    };
    while Instant::now() < deadline && find(&entries, "services published").is_none() {
        receiver
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = receiver.recv(&mut buf) {
            entries.push(parse_native(&buf[..n]));
        }
    }
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);

    let starting = find(&entries, "clawnode starting")
        .unwrap_or_else(|| panic!("no start entry in {entries:?}; stderr: {stderr}"));
    assert_eq!(field(&starting, "SYSLOG_IDENTIFIER"), Some("clawnode"));
    assert_eq!(field(&starting, "PROVIDER"), Some("fake"));
    assert_eq!(field(&starting, "NODE"), Some("test-node"));
    assert!(field(&starting, "PRIORITY").is_some());
    let joined = find(&entries, "joined the mesh").expect("mesh entry");
    assert_eq!(field(&joined, "COMPONENT"), Some("mesh"));
    assert_eq!(field(&joined, "MESH"), Some("fake fake0 10.100.0.5/16"));
    assert!(
        !stderr.contains("clawnode starting"),
        "with journald present, stderr stays quiet: {stderr}"
    );
}

fn field<'a>(entry: &'a [(String, String)], key: &str) -> Option<&'a str> {
    entry
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// journald's native protocol: `KEY=value\n`, or `KEY\n` + 64-bit LE length + bytes + `\n`.
fn parse_native(mut data: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while !data.is_empty() {
        let Some(eol) = data.iter().position(|&b| b == b'\n') else {
            break;
        };
        let line = &data[..eol];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            let key = String::from_utf8_lossy(&line[..eq]).into_owned();
            fields.push((key, String::from_utf8_lossy(&line[eq + 1..]).into_owned()));
            data = &data[eol + 1..];
            continue;
        }
        let key = String::from_utf8_lossy(line).into_owned();
        let rest = &data[eol + 1..];
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        let value = String::from_utf8_lossy(&rest[8..8 + len]).into_owned();
        fields.push((key, value));
        data = &rest[8 + len + 1..];
    }
    fields
}
