//! The stand-in tailscaled (tests/support/tailscaled.rs) as a program, for the VM test: it
//! serves the LocalAPI on <socket> and keeps <record> current with every call and every auth
//! key it was given, and what is advertised now (`advertised <AdvertiseServices JSON>`,
//! `served <serve-config Services names JSON>`), so the guest can check what the sandboxed
//! unit sent. Build:
//! `cargo build --features test-fakes --example tailscaled-standin`
//! Usage: tailscaled-standin <socket> <record> [operator]
//! (operator: the `OperatorUser` pref, the one non-root user whose writes it takes; default
//! none, though the prefs capture names "alex")

// Test code: a failed unwrap is a failed test, and benchmarks print their figures.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

#[path = "../support/tailscaled.rs"]
mod tailscaled;

use std::path::Path;
use std::time::Duration;

const VERSION: &str = "1.102.2";

fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(socket), Some(record)) = (args.next(), args.next()) else {
        eprintln!("usage: tailscaled-standin <socket> <record> [operator]");
        std::process::exit(2);
    };
    let standin = tailscaled::StandIn::start(Path::new(&socket), VERSION);
    let operator = args.next().map(|o| o.to_string_lossy().into_owned());
    standin.with(|s| s.prefs["OperatorUser"] = operator.unwrap_or_default().into());
    let mut written = None;
    loop {
        let text = standin.with(|s| {
            let calls = s.calls.iter().map(|c| format!("call {c}\n"));
            let keys = s.auth_keys.iter().map(|k| format!("authkey {k}\n"));
            let state = format!("state {}\n", s.backend_state);
            // What is advertised now, for the guest's health-check assertions.
            let advertised = format!("advertised {}\n", s.prefs["AdvertiseServices"]);
            let served: Vec<&String> = s.serve["Services"]
                .as_object()
                .map(|m| m.keys().collect())
                .unwrap_or_default();
            let served = format!("served {}\n", serde_json::json!(served));
            calls
                .chain(keys)
                .chain([state, advertised, served])
                .collect::<String>()
        });
        if written.as_ref() != Some(&text) {
            let partial = Path::new(&record).with_extension("partial");
            std::fs::write(&partial, &text).expect("write the record");
            std::fs::rename(&partial, &record).expect("publish the record");
            written = Some(text);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
