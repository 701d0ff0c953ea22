//! Measurements the README reports: exec → READY=1 with the fake provider, idle RSS, idle CPU,
//! and the same idle figures for a daemon whose two services are health-checked against one
//! whose checks are off.
//! Figures only, no thresholds (these machines are noisy). Run:
//! `cargo test --release --features test-fakes --test footprint -- --ignored --nocapture`

// Test code: a failed unwrap is a failed test, and benchmarks print their figures.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]
#![cfg(feature = "test-fakes")]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::{BIN, Node, fake_config};

const RUNS: usize = 20;

#[test]
#[ignore = "takes over a minute; run by tests/run-all.sh with --release"]
fn footprint_exec_to_ready_idle_rss_and_idle_cpu() {
    // Reference in the same run: exec → exit of `clawnode version`, the cost of starting the
    // binary at all.
    let mut reference = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let status = Command::new(BIN).arg("version").output().unwrap().status;
        reference.push(t.elapsed());
        assert!(status.success());
    }

    let mut to_ready = Vec::new();
    for _ in 0..RUNS {
        let mut node = Node::start(|d| fake_config(d, "", ""), &[]);
        node.recv_until("READY=1", Duration::from_secs(10));
        to_ready.push(node.started.elapsed());
        node.signal(Signal::SIGTERM);
        node.wait_exit(Duration::from_secs(6));
    }
    let (ready_median, ref_median) = (median(&mut to_ready), median(&mut reference));
    println!(
        "exec -> READY=1 (fake mesh, NVML absent): median {:.1} ms, min {:.1} ms, max {:.1} ms over {RUNS} runs",
        ms(ready_median),
        ms(to_ready[0]),
        ms(to_ready[RUNS - 1])
    );
    println!(
        "reference exec -> exit of `clawnode version`: median {:.1} ms; ratio ready/reference = {:.2}",
        ms(ref_median),
        ready_median.as_secs_f64() / ref_median.as_secs_f64()
    );

    // Idle: the daemon as above, and the same two services checked (tcp, every 5 s, both
    // healthy) and unchecked (type = "none"), side by side over the same window.
    let ports = [serve_forever(), serve_forever()];
    let base = Node::start(|d| fake_config(d, "", ""), &[]);
    let checked = Node::start(
        |d| two_services(d, ports, "type = \"tcp\"\ninterval = \"5s\""),
        &[],
    );
    let unchecked = Node::start(|d| two_services(d, ports, "type = \"none\""), &[]);
    for node in [&base, &checked, &unchecked] {
        node.recv_until("READY=1", Duration::from_secs(10));
    }
    std::thread::sleep(Duration::from_secs(2));
    let field = |pid: i32, name: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let pids = [
        base.pid().as_raw(),
        checked.pid().as_raw(),
        unchecked.pid().as_raw(),
    ];
    let pid = pids[0];
    println!(
        "idle RSS: VmRSS {}, VmHWM {}, threads {}",
        field(pid, "VmRSS:"),
        field(pid, "VmHWM:"),
        field(pid, "Threads:")
    );
    let rss = pids.map(support::rss_kb);

    let window = Duration::from_secs(60);
    // Asked outside the window: answering `status` costs the daemon CPU too.
    let checks_before = checks_run(&checked);
    let before = pids.map(cpu_ticks);
    let before_ns = pids.map(cpu_ns);
    std::thread::sleep(window);
    let after = pids.map(cpu_ticks);
    let after_ns = pids.map(cpu_ns);
    let checks = checks_run(&checked) - checks_before;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap_or(100) as f64;
    let cpu = |i: usize| (after[i] - before[i]) as f64 / hz;
    let cpu_fine = |i: usize| cpu_ns_delta(&before_ns[i], &after_ns[i]) as f64 / 1e9;
    println!(
        "idle CPU over {} s: {:.3} CPU-seconds from utime+stime (clock tick {:.0} ms), {:.6} CPU-seconds from schedstat",
        window.as_secs(),
        cpu(0),
        1000.0 / hz,
        cpu_fine(0)
    );
    println!(
        "health checks at idle, 2 services, same {} s window: with tcp checks every 5 s (both healthy): VmRSS {} kB, CPU {:.6} CPU-s (schedstat), {checks} checks in the window ({:.0} us each); with type = \"none\": VmRSS {} kB, CPU {:.6} CPU-s; difference {:+} kB RSS (ratio {:.3}), {:+.6} CPU-s (target: nothing measurable; idle CPU < 0.05 CPU-s)",
        window.as_secs(),
        rss[1],
        cpu_fine(1),
        cpu_fine(1) * 1e6 / checks.max(1) as f64,
        rss[2],
        cpu_fine(2),
        rss[1] - rss[2],
        rss[1] as f64 / rss[2] as f64,
        cpu_fine(1) - cpu_fine(2)
    );
    for pid in pids {
        assert!(
            std::fs::metadata(format!("/proc/{pid}")).is_ok(),
            "daemon still running"
        );
    }
}

/// A loopback port that accepts (and closes) every connection for the rest of the test.
fn serve_forever() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    port
}

/// The fake mesh with two services on `ports`, both checked with `check` (keys of the
/// `[services.<name>.check]` table).
fn two_services(d: &std::path::Path, ports: [u16; 2], check: &str) -> String {
    let base = fake_config(d, "", "");
    // fake_config's own molt-provider (unchecked, on 8443) is replaced by the two below.
    let head = &base[..base.find("[services.molt-provider]").unwrap()];
    format!(
        "{head}[services.gateway]\nport = {}\nmode = \"tcp\"\n[services.gateway.check]\n{check}\n\n[services.molt-provider]\nport = {}\nmode = \"tcp\"\nrequires_gpus = false\n[services.molt-provider.check]\n{check}\n",
        ports[0], ports[1]
    )
}

/// How many checks the daemon ran, summed over its services (`status --json`).
fn checks_run(node: &Node) -> u64 {
    let out = node.cli(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    doc["services"]["checks"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["checks"].as_u64()).sum())
        .unwrap_or(0)
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Nanoseconds on CPU per thread, from /proc/<pid>/task/*/schedstat (finer than clock ticks).
fn cpu_ns(pid: i32) -> std::collections::HashMap<String, u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let ns = stat.split_whitespace().next()?.parse().ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect()
}

/// CPU time spent between two samples by the threads alive at the second one.
fn cpu_ns_delta(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> u64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
