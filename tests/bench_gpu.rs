//! What the README reports for GPUs: one `/metrics` scrape with 8 stand-in GPUs against a
//! same-run reference (a `/v1/health/live` round trip on the same socket), and the daemon's
//! idle RSS with 8 GPUs against 0. Figures only, no thresholds. Run:
//! `cargo test --release --features test-fakes --test bench_gpu -- --ignored --nocapture`

// Test code: a failed unwrap is a failed test, and benchmarks print their figures.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]
#![cfg(feature = "test-fakes")]

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use support::nvml::{FakeNvml, library};
use support::{Node, fake_config};

const SCRAPES: usize = 200;

fn round_trip(socket: &Path, path: &str) -> (Duration, usize) {
    let started = Instant::now();
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    (started.elapsed(), reply.len())
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn rss_kb(node: &Node) -> u64 {
    support::rss_kb(node.pid().as_raw()) as u64
}

fn start(dir: &Path, gpus: u32) -> (Node, FakeNvml) {
    let fake = FakeNvml::new(dir, &format!("gpus = {gpus}\n"));
    let env = fake.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = Node::start(
        |d| {
            fake_config(d, "", "").replace(
                &format!(
                    "nvml_library = \"{}/no-such-dir/libnvidia-ml.so.1\"",
                    d.display()
                ),
                &format!("nvml_library = \"{}\"", library().display()),
            )
        },
        &env,
    );
    node.recv_until("READY=1", Duration::from_secs(10));
    (node, fake)
}

#[test]
#[ignore = "a measurement; run by tests/run-all.sh with --release"]
fn metrics_scrape_with_8_gpus_and_rss_against_0_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _fake) = start(dir.path(), 8);
    let socket = node.path("run/clawnode.sock");
    // Let the first sample land, then warm up.
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..20 {
        round_trip(&socket, "/metrics");
    }
    let (mut scrapes, mut reference) = (Vec::new(), Vec::new());
    let mut size = 0;
    for _ in 0..SCRAPES {
        let (t, n) = round_trip(&socket, "/metrics");
        scrapes.push(t);
        size = n;
        reference.push(round_trip(&socket, "/v1/health/live").0);
    }
    let (scrape, live) = (median(&mut scrapes), median(&mut reference));
    println!(
        "/metrics with 8 GPUs: median {:.3} ms over {SCRAPES} scrapes ({size} bytes); reference /v1/health/live {:.3} ms; ratio {:.1}",
        scrape.as_secs_f64() * 1000.0,
        live.as_secs_f64() * 1000.0,
        scrape.as_secs_f64() / live.as_secs_f64()
    );
    // Idle RSS after the scrapes settle, against a daemon with no GPUs in the same run.
    std::thread::sleep(Duration::from_secs(2));
    let with_8 = rss_kb(&node);
    let dir0 = tempfile::tempdir().unwrap();
    let (zero, _fake0) = start(dir0.path(), 0);
    // The same scrapes, so both daemons have run the same code and only the GPUs differ.
    let socket0 = zero.path("run/clawnode.sock");
    for _ in 0..SCRAPES + 20 {
        round_trip(&socket0, "/metrics");
        round_trip(&socket0, "/v1/health/live");
    }
    std::thread::sleep(Duration::from_secs(2));
    let with_0 = rss_kb(&zero);
    println!(
        "idle VmRSS with 8 GPUs {with_8} kB, with 0 GPUs {with_0} kB: difference {} kB (target within 1 MB)",
        with_8 as i64 - with_0 as i64
    );
}
