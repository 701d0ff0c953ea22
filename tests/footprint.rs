//! Measurements the README reports: exec → READY=1 with the fake provider, idle RSS, idle CPU.
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

    let node = Node::start(|d| fake_config(d, "", ""), &[]);
    node.recv_until("READY=1", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let pid = node.pid().as_raw();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    println!(
        "idle RSS: VmRSS {}, VmHWM {}, threads {}",
        field("VmRSS:"),
        field("VmHWM:"),
        field("Threads:")
    );

    let window = Duration::from_secs(60);
    let before = cpu_ticks(pid);
    let before_ns = cpu_ns(pid);
    std::thread::sleep(window);
    let after = cpu_ticks(pid);
    let after_ns = cpu_ns(pid);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap_or(100) as f64;
    let cpu = (after - before) as f64 / hz;
    println!(
        "idle CPU over {} s: {cpu:.3} CPU-seconds from utime+stime (clock tick {:.0} ms), {:.6} CPU-seconds from schedstat",
        window.as_secs(),
        1000.0 / hz,
        cpu_ns_delta(&before_ns, &after_ns) as f64 / 1e9
    );
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_ok(),
        "daemon still running"
    );
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
