//! GPUs through the real nvml-wrapper, loaded against the stand-in libnvidia-ml.so.1
//! (tests/nvml): `clawnode gpus`, the daemon's status, `/metrics` (checked by promtool when it
//! is installed), XID events, a GPU lost mid-run, MIG layout changes.

use crate::support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::nvml::{FakeNvml, library};
use crate::support::{BIN, Node, fake_config, last_status};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

fn gpu_config(d: &Path, extra: &str) -> String {
    fake_config(d, "", extra).replace(
        &format!(
            "nvml_library = \"{}/no-such-dir/libnvidia-ml.so.1\"",
            d.display()
        ),
        &format!(
            "nvml_library = \"{}\"\npoll_interval = \"1s\"",
            library().display()
        ),
    )
}

fn start(fake_text: &str, extra: &str) -> (Node, FakeNvml) {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeNvml::new(dir.path(), fake_text);
    let env = fake.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = Node::start(|d| gpu_config(d, extra), &env);
    std::mem::forget(dir);
    (node, fake)
}

/// GET over the API socket; returns (status line and headers, body).
fn get(socket: &Path, path: &str) -> (String, String) {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

fn metrics(node: &Node) -> String {
    get(&node.path("run/clawnode.sock"), "/metrics").1
}

/// The sample line of `name` for GPU `gpu`, if any.
fn series(text: &str, name: &str, gpu: u32) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("gpu=\"{gpu}\"")))
        .map(str::to_string)
}

#[test]
fn gpus_lists_the_inventory_with_mig_and_leaves_unsupported_fields_out() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeNvml::new(
        dir.path(),
        "gpus = 2\nmig = 0:1g.10gb,1g.10gb,3g.40gb\nnot_supported = serial,temperature\n",
    );
    let out = Command::new(BIN)
        .args([
            "gpus",
            "--json",
            "--config",
            "/nonexistent.toml",
            "--nvml-library",
        ])
        .arg(library())
        .env("FAKE_NVML_CONFIG", &fake.config)
        .output()
        .unwrap();
    support::succeeded(&out);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let inv = &doc["inventory"];
    assert_eq!(inv["driver_version"], "580.95.05");
    assert_eq!(inv["cuda_driver_version"], "13.0");
    let gpu0 = &inv["gpus"][0];
    assert_eq!(gpu0["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(gpu0["pci_bus_id"], "00000000:18:00.0");
    assert_eq!(gpu0["memory_total_bytes"], 85520809984u64);
    assert_eq!(gpu0["compute_capability"], "9.0");
    assert_eq!(gpu0["power_limit_milliwatts"], 700000);
    assert_eq!(gpu0["ecc_enabled"], true);
    assert_eq!(gpu0["mig_enabled"], true);
    let profiles: Vec<&str> = gpu0["mig_devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["profile"].as_str().unwrap())
        .collect();
    assert_eq!(profiles, ["1g.10gb", "1g.10gb", "3g.40gb"]);
    assert_eq!(gpu0["mig_devices"][2]["memory_total_bytes"], 40u64 << 30);
    assert_eq!(gpu0["mig_devices"][0]["gpu_instance_id"], 1);
    assert_eq!(inv["gpus"][1]["mig_enabled"], false);
    assert!(
        gpu0.get("serial").is_none(),
        "NotSupported is absent, not null or a sentinel: {gpu0}"
    );
    let m1 = &doc["metrics"][1];
    assert!(m1.get("temperature_celsius").is_none(), "{m1}");
    assert_eq!(m1["power_milliwatts"], 101000);
    assert_eq!(m1["memory_used_bytes"], 2u64 << 30);
    assert_eq!(m1["ecc_corrected_volatile"], 1);
    assert_eq!(m1["pcie_link_gen"], 5);

    let table = Command::new(BIN)
        .args(["gpus", "--config", "/nonexistent.toml", "--nvml-library"])
        .arg(library())
        .env("FAKE_NVML_CONFIG", &fake.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("driver 580.95.05, CUDA 13.0"), "{text}");
    assert!(text.contains("MIG 3g.40gb"), "{text}");
}

#[test]
fn a_driver_that_is_not_loaded_is_a_reason_and_the_node_is_still_ready() {
    let (node, _fake) = start("init = driver_not_loaded\n", "");
    let seen = node.recv_until("READY=1", WAIT);
    let status = last_status(&seen);
    assert!(status.contains("0 GPUs (driver_not_loaded)"), "{status}");
    assert_eq!(
        node.status_json()["gpu"]["unavailable_reason"],
        "driver_not_loaded"
    );
}

#[test]
fn metrics_use_dcgm_names_omit_unsupported_fields_and_pass_promtool() {
    let (node, _fake) = start("gpus = 2\nnot_supported = temperature\n", "");
    let seen = node.recv_until("READY=1", WAIT);
    assert!(last_status(&seen).contains("2 GPUs"), "{seen:?}");
    support::wait_until(WAIT, "a sample", &node, || {
        series(&metrics(&node), "DCGM_FI_DEV_FB_FREE", 1).is_some()
    });
    let (head, text) = get(&node.path("run/clawnode.sock"), "/metrics");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    let fb = series(&text, "DCGM_FI_DEV_FB_USED", 1).unwrap();
    assert!(
        fb.contains("UUID=\"GPU-00000000-0000-0000-0000-000000000001\""),
        "{fb}"
    );
    assert!(fb.contains("pci_bus_id=\"00000000:19:00.0\""), "{fb}");
    assert!(fb.contains("modelName=\"NVIDIA H100 80GB HBM3\""), "{fb}");
    assert!(fb.contains("Hostname=\"test-node\""), "{fb}");
    assert!(fb.ends_with(" 2048"), "2 GiB used is 2048 MiB: {fb}");
    assert!(
        series(&text, "DCGM_FI_DEV_POWER_USAGE", 0)
            .unwrap()
            .ends_with(" 100")
    );
    assert!(
        !text.contains("DCGM_FI_DEV_GPU_TEMP"),
        "NotSupported leaves the series out:\n{text}"
    );
    assert!(text.contains("# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter"));
    assert!(text.contains("clawnode_ready 1"));
    assert!(text.contains("clawnode_phase{phase=\"ready\"} 1"));
    assert!(text.contains("clawnode_gpus 2"));

    let Some((code, report)) = support::promtool_check(&text) else {
        return;
    };
    // Exit 1 is a format error: never acceptable. Exit 3 is lint advice; DCGM's own names
    // break two of its rules on purpose (camelCase labels such as modelName, counters without
    // _total), and dashboards depend on exactly those names. Everything else must be clean.
    match code {
        Some(0) => {}
        Some(3) => {
            for problem in report.lines().filter(|l| !l.trim().is_empty()) {
                let dcgm = problem.starts_with("DCGM_FI_DEV_")
                    && (problem.ends_with(
                        "label names should be written in 'snake_case' not 'camelCase'",
                    ) || problem.ends_with("counter metrics should have \"_total\" suffix"));
                assert!(dcgm, "promtool: {problem}\n{text}");
            }
        }
        other => panic!("promtool check metrics exited {other:?}:\n{report}\n{text}"),
    }
}

#[test]
fn an_xid_event_increments_its_counter_exactly_once() {
    let (node, fake) = start("gpus = 2\n", "");
    node.recv_until("READY=1", WAIT);
    let count = |text: &str| {
        series(text, "clawnode_gpu_xid_errors_total", 1)
            .filter(|l| l.contains("xid=\"79\""))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
    };
    assert!(count(&metrics(&node)).is_none());
    fake.append("xid = 1:79");
    support::wait_until(WAIT, "the XID", &node, || count(&metrics(&node)).is_some());
    assert_eq!(count(&metrics(&node)).as_deref(), Some("1"));
    std::thread::sleep(Duration::from_millis(1500));
    let text = metrics(&node);
    assert_eq!(count(&text).as_deref(), Some("1"), "one event, one count");
    assert!(
        series(&text, "DCGM_FI_DEV_XID_ERRORS", 1)
            .unwrap()
            .ends_with(" 79")
    );
    assert!(
        series(&text, "DCGM_FI_DEV_XID_ERRORS", 0).is_none(),
        "GPU 0 had none"
    );
    fake.append("xid = 1:79");
    support::wait_until(WAIT, "the repeat", &node, || {
        count(&metrics(&node)).as_deref() == Some("2")
    });
    let doc = node.status_json();
    assert_eq!(doc["gpu"]["xid_errors"][0]["gpu"], 1);
    assert_eq!(doc["gpu"]["xid_errors"][0]["xid"], 79);
    assert_eq!(doc["gpu"]["xid_errors"][0]["count"], 2);
    assert!(node.stderr().contains("XID error"), "logged as a warning");
}

#[test]
fn a_gpu_lost_mid_run_is_reported_and_the_others_still_are() {
    let (node, fake) = start("gpus = 3\n", "");
    node.recv_until("READY=1", WAIT);
    support::wait_until(WAIT, "a sample", &node, || {
        series(&metrics(&node), "DCGM_FI_DEV_GPU_TEMP", 2).is_some()
    });
    fake.write("gpus = 3\nlost = 1\n");
    support::wait_until(WAIT, "the lost GPU", &node, || {
        series(&metrics(&node), "clawnode_gpu_lost", 1).is_some_and(|l| l.ends_with(" 1"))
    });
    let text = metrics(&node);
    assert!(
        series(&text, "DCGM_FI_DEV_GPU_TEMP", 0)
            .unwrap()
            .ends_with(" 30")
    );
    assert!(
        series(&text, "DCGM_FI_DEV_GPU_TEMP", 2)
            .unwrap()
            .ends_with(" 32")
    );
    assert!(series(&text, "DCGM_FI_DEV_GPU_TEMP", 1).is_none());
    support::wait_until(WAIT, "the status line", &node, || {
        node.status_json()["status"]
            .as_str()
            .is_some_and(|s| s.contains("3 GPUs (1 lost)"))
    });
    let doc = node.status_json();
    assert_eq!(doc["gpu"]["devices"][1]["lost"], true);
    assert_eq!(doc["gpu"]["devices"][2]["lost"], false);
    assert_eq!(doc["ready"], true, "a lost GPU does not unready the node");
}

#[test]
fn a_new_mig_layout_is_picked_up_without_a_restart() {
    let (node, fake) = start("gpus = 1\n", "");
    node.recv_until("READY=1", WAIT);
    assert_eq!(
        node.status_json()["gpu"]["devices"][0]["mig_devices"],
        serde_json::json!([])
    );
    fake.write("gpus = 1\nmig = 0:3g.40gb,3g.40gb\n");
    support::wait_until(WAIT, "the MIG layout", &node, || {
        node.status_json()["gpu"]["devices"][0]["mig_devices"]
            .as_array()
            .is_some_and(|m| m.len() == 2)
    });
    assert!(node.stderr().contains("GPU layout changed"));
}

#[test]
fn metrics_listen_serves_only_metrics_over_tcp() {
    let port = support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeNvml::new(dir.path(), "gpus = 1\n");
    let env = fake.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = Node::start(
        |d| {
            gpu_config(d, "").replace(
                &format!("socket = \"{}/run/clawnode.sock\"", d.display()),
                &format!(
                    "socket = \"{}/run/clawnode.sock\"\nmetrics_listen = \"127.0.0.1:{port}\"",
                    d.display()
                ),
            )
        },
        &env,
    );
    node.recv_until("READY=1", WAIT);
    let fetch = |path: &str| {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    };
    let reply = fetch("/metrics");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        !node.stderr().contains("beyond loopback"),
        "loopback is not warned about"
    );
    assert!(reply.contains("clawnode_ready 1"));
    assert!(
        fetch("/v1/status").starts_with("HTTP/1.1 404"),
        "status stays on the socket"
    );
}

#[test]
fn losing_every_required_gpu_makes_the_node_unready() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeNvml::new(dir.path(), "gpus = 2\n");
    let env = fake.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = Node::start(
        |d| gpu_config(d, "").replace("enabled = true", "enabled = true\nrequired = true"),
        &env,
    );
    node.recv_until("READY=1", WAIT);
    fake.write("gpus = 2\nlost = 0,1\n");
    support::wait_until(WAIT, "the node to become unready", &node, || {
        node.status_json()["ready"] == false
    });
    let status = node.status_json()["status"].as_str().unwrap().to_string();
    assert!(status.contains("GPUs are required"), "{status}");
}
