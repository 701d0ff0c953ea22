//! `/metrics`: the Prometheus text exposition of the GPUs (DCGM exporter's names and labels,
//! so existing dashboards work) and of the agent itself (`clawnode_*`).
//!
//! A fresh registry per scrape: the families are rebuilt from the latest snapshot, so a GPU
//! that disappears also disappears from the output instead of keeping a stale value.

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use super::{ServiceCheckDoc, StatusDoc};
use crate::core::health::DURATION_BUCKETS;
use crate::core::tailscale_relay::PathKind;
use crate::gateway::view::RoleDoc;
use crate::gpu::{GpuInfo, Snapshot};
use crate::mesh::TunnelPeer;
use crate::mesh::live::{GatewayDoc, PathsDoc};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// DCGM's label set for a GPU, kept as DCGM spells it (camelCase and all) for dashboards.
const GPU_LABELS: [&str; 6] = [
    "gpu",
    "UUID",
    "pci_bus_id",
    "device",
    "modelName",
    "Hostname",
];
/// The same labels for clawnode's own series, in Prometheus's snake_case.
const OWN_LABELS: [&str; 6] = [
    "gpu",
    "uuid",
    "pci_bus_id",
    "device",
    "model_name",
    "hostname",
];

pub fn render(
    status: &StatusDoc,
    peers: &[TunnelPeer],
    gateway: Option<&GatewayDoc>,
    paths: Option<&PathsDoc>,
    gpus: &Snapshot,
    hostname: &str,
    now_unix_ms: u64,
) -> Result<String, prometheus::Error> {
    let registry = Registry::new();
    let mut families = Families::new(&registry);
    gpu_series(&mut families, gpus, hostname)?;
    agent_series(&mut families, status, peers, gpus, now_unix_ms)?;
    service_series(&mut families, &status.services.checks)?;
    if let Some(gateway) = gateway {
        gateway_series(&mut families, gateway)?;
    }
    if let Some(role) = &status.gateway_role {
        gateway_role_series(&mut families, role)?;
    }
    if let Some(paths) = paths {
        path_series(&mut families, paths)?;
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Registers families on first use, so only series with a value are exposed.
struct Families<'a> {
    registry: &'a Registry,
    gauges: Vec<(String, GaugeVec)>,
    counters: Vec<(String, IntCounterVec)>,
    int_gauges: Vec<(String, IntGaugeVec)>,
}

impl<'a> Families<'a> {
    fn new(registry: &'a Registry) -> Self {
        Self {
            registry,
            gauges: Vec::new(),
            counters: Vec::new(),
            int_gauges: Vec::new(),
        }
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        values: &[&str],
        value: f64,
    ) -> Result<(), prometheus::Error> {
        let family = match self.gauges.iter().find(|(n, _)| n == name) {
            Some((_, f)) => f.clone(),
            None => {
                let f = GaugeVec::new(Opts::new(name, help), labels)?;
                self.register(f.clone())?;
                self.gauges.push((name.to_string(), f.clone()));
                f
            }
        };
        family.get_metric_with_label_values(values)?.set(value);
        Ok(())
    }

    fn int_gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        values: &[&str],
        value: i64,
    ) -> Result<(), prometheus::Error> {
        let family = match self.int_gauges.iter().find(|(n, _)| n == name) {
            Some((_, f)) => f.clone(),
            None => {
                let f = IntGaugeVec::new(Opts::new(name, help), labels)?;
                self.register(f.clone())?;
                self.int_gauges.push((name.to_string(), f.clone()));
                f
            }
        };
        family.get_metric_with_label_values(values)?.set(value);
        Ok(())
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        values: &[&str],
        value: u64,
    ) -> Result<(), prometheus::Error> {
        let family = match self.counters.iter().find(|(n, _)| n == name) {
            Some((_, f)) => f.clone(),
            None => {
                let f = IntCounterVec::new(Opts::new(name, help), labels)?;
                self.register(f.clone())?;
                self.counters.push((name.to_string(), f.clone()));
                f
            }
        };
        family.get_metric_with_label_values(values)?.inc_by(value);
        Ok(())
    }

    fn register(&self, collector: impl Collector + 'static) -> Result<(), prometheus::Error> {
        self.registry.register(Box::new(collector))
    }
}

fn gpu_labels(gpu: &GpuInfo, hostname: &str) -> [String; 6] {
    [
        gpu.index.to_string(),
        gpu.uuid.clone().unwrap_or_default(),
        gpu.pci_bus_id.clone().unwrap_or_default(),
        format!("nvidia{}", gpu.index),
        gpu.name.clone().unwrap_or_default(),
        hostname.to_string(),
    ]
}

fn gpu_series(f: &mut Families, snap: &Snapshot, hostname: &str) -> Result<(), prometheus::Error> {
    for gpu in &snap.inventory.gpus {
        let owned = gpu_labels(gpu, hostname);
        let labels: Vec<&str> = owned.iter().map(String::as_str).collect();
        f.int_gauge(
            "clawnode_gpu_lost",
            "1 when the GPU has fallen off the bus.",
            &OWN_LABELS,
            &labels,
            i64::from(gpu.lost),
        )?;
        let Some(m) = snap
            .metrics
            .iter()
            .find(|m| m.index == gpu.index && !m.lost)
        else {
            continue;
        };
        let mib = |b: Option<u64>| b.map(|b| (b / (1024 * 1024)) as f64);
        let gauges: [(&str, &str, Option<f64>); 16] = [
            (
                "DCGM_FI_DEV_GPU_UTIL",
                "GPU utilization (in %).",
                m.gpu_utilization_percent.map(f64::from),
            ),
            (
                "DCGM_FI_DEV_MEM_COPY_UTIL",
                "Memory utilization (in %).",
                m.memory_utilization_percent.map(f64::from),
            ),
            (
                "DCGM_FI_DEV_FB_USED",
                "Framebuffer memory used (in MiB).",
                mib(m.memory_used_bytes),
            ),
            (
                "DCGM_FI_DEV_FB_FREE",
                "Framebuffer memory free (in MiB).",
                mib(m.memory_free_bytes),
            ),
            (
                "DCGM_FI_DEV_FB_RESERVED",
                "Framebuffer memory reserved (in MiB).",
                mib(m.memory_reserved_bytes),
            ),
            (
                "DCGM_FI_DEV_GPU_TEMP",
                "GPU temperature (in C).",
                m.temperature_celsius.map(f64::from),
            ),
            (
                "DCGM_FI_DEV_POWER_USAGE",
                "Power draw (in W).",
                m.power_milliwatts.map(|p| f64::from(p) / 1000.0),
            ),
            (
                "DCGM_FI_DEV_SM_CLOCK",
                "SM clock frequency (in MHz).",
                m.sm_clock_mhz.map(f64::from),
            ),
            (
                "DCGM_FI_DEV_MEM_CLOCK",
                "Memory clock frequency (in MHz).",
                m.memory_clock_mhz.map(f64::from),
            ),
            (
                "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
                "Current clock throttle reasons (bitmask).",
                m.throttle_reasons.map(|r| r as f64),
            ),
            (
                "DCGM_FI_DEV_PCIE_LINK_GEN",
                "Current PCIe link generation.",
                m.pcie_link_gen.map(f64::from),
            ),
            (
                "DCGM_FI_DEV_PCIE_LINK_WIDTH",
                "Current PCIe link width.",
                m.pcie_link_width.map(f64::from),
            ),
            (
                "DCGM_FI_DEV_ROW_REMAP_PENDING",
                "Row remapping pending (1 or 0).",
                m.remapped_rows_pending.map(|b| f64::from(u8::from(b))),
            ),
            (
                "DCGM_FI_DEV_ROW_REMAP_FAILURE",
                "Row remapping failed (1 or 0).",
                m.remapped_rows_failure.map(|b| f64::from(u8::from(b))),
            ),
            (
                "DCGM_FI_DEV_XID_ERRORS",
                "Value of the last XID error encountered.",
                snap.xids.last(gpu.index).map(|c| c as f64),
            ),
            (
                "DCGM_FI_DEV_POWER_MGMT_LIMIT",
                "Power management limit (in W).",
                gpu.power_limit_milliwatts.map(|p| f64::from(p) / 1000.0),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                f.gauge(name, help, &GPU_LABELS, &labels, value)?;
            }
        }
        let counters: [(&str, &str, Option<u64>); 9] = [
            (
                "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                "Total energy consumption since boot (in mJ).",
                m.energy_millijoules,
            ),
            (
                "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
                "Total number of single-bit volatile ECC errors.",
                m.ecc_corrected_volatile,
            ),
            (
                "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
                "Total number of double-bit volatile ECC errors.",
                m.ecc_uncorrected_volatile,
            ),
            (
                "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
                "Total number of single-bit persistent ECC errors.",
                m.ecc_corrected_aggregate,
            ),
            (
                "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
                "Total number of double-bit persistent ECC errors.",
                m.ecc_uncorrected_aggregate,
            ),
            (
                "DCGM_FI_DEV_RETIRED_SBE",
                "Total number of retired pages due to single-bit errors.",
                m.retired_pages_single_bit,
            ),
            (
                "DCGM_FI_DEV_RETIRED_DBE",
                "Total number of retired pages due to double-bit errors.",
                m.retired_pages_double_bit,
            ),
            (
                "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
                "Number of remapped rows for correctable errors.",
                m.remapped_rows_correctable.map(u64::from),
            ),
            (
                "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
                "Number of remapped rows for uncorrectable errors.",
                m.remapped_rows_uncorrectable.map(u64::from),
            ),
        ];
        for (name, help, value) in counters {
            if let Some(value) = value {
                f.counter(name, help, &GPU_LABELS, &labels, value)?;
            }
        }
    }
    let xid_labels: Vec<&str> = OWN_LABELS.iter().copied().chain(["xid"]).collect();
    for (&(index, code), count) in &snap.xids.counts {
        let Some(gpu) = snap.inventory.gpus.iter().find(|g| g.index == index) else {
            continue;
        };
        let mut owned = gpu_labels(gpu, hostname).to_vec();
        owned.push(code.to_string());
        let labels: Vec<&str> = owned.iter().map(String::as_str).collect();
        f.counter(
            "clawnode_gpu_xid_errors_total",
            "Critical XID errors reported by NVML, per GPU and XID code.",
            &xid_labels,
            &labels,
            count.count,
        )?;
        f.gauge(
            "clawnode_gpu_xid_last_seen_timestamp_seconds",
            "When this XID code was last seen on this GPU (Unix time).",
            &xid_labels,
            &labels,
            count.last_seen_unix_ms as f64 / 1000.0,
        )?;
    }
    Ok(())
}

fn agent_series(
    f: &mut Families,
    status: &StatusDoc,
    peers: &[TunnelPeer],
    gpus: &Snapshot,
    now_unix_ms: u64,
) -> Result<(), prometheus::Error> {
    f.int_gauge(
        "clawnode_ready",
        "1 when the node is ready (mesh joined, GPUs probed, services published).",
        &[],
        &[],
        i64::from(status.ready),
    )?;
    for phase in ["starting", "joining", "ready", "degraded", "stopping"] {
        f.int_gauge(
            "clawnode_phase",
            "1 for the supervisor's current phase.",
            &["phase"],
            &[phase],
            i64::from(status.phase == phase),
        )?;
    }
    f.int_gauge(
        "clawnode_mesh_peers",
        "Peers configured on the mesh.",
        &[],
        &[],
        status.mesh.peers as i64,
    )?;
    f.int_gauge(
        "clawnode_services_advertised",
        "Services the mesh currently advertises for this node.",
        &[],
        &[],
        if status.services.advertised {
            // Only healthy services are advertised (issue 14's checks).
            status
                .services
                .checks
                .iter()
                .filter(|c| c.advertised)
                .count() as i64
        } else {
            0
        },
    )?;
    f.int_gauge(
        "clawnode_gpus",
        "GPUs found by the last probe.",
        &[],
        &[],
        gpus.inventory.gpus.len() as i64,
    )?;
    f.counter(
        "clawnode_gpu_probe_errors_total",
        "GPU samples that failed because the GPU was lost or NVML refused.",
        &[],
        &[],
        gpus.probe_errors,
    )?;
    for peer in peers {
        let name = peer.name.clone().unwrap_or_else(|| peer.public_key.clone());
        let labels = [name.as_str()];
        if let Some(at) = peer.last_handshake_unix_ms {
            f.gauge(
                "clawnode_wireguard_peer_last_handshake_age_seconds",
                "Seconds since the last WireGuard handshake with the peer.",
                &["peer"],
                &labels,
                now_unix_ms.saturating_sub(at) as f64 / 1000.0,
            )?;
        }
        f.counter(
            "clawnode_wireguard_peer_receive_bytes_total",
            "Bytes received from the peer.",
            &["peer"],
            &labels,
            peer.rx_bytes,
        )?;
        f.counter(
            "clawnode_wireguard_peer_transmit_bytes_total",
            "Bytes sent to the peer.",
            &["peer"],
            &labels,
            peer.tx_bytes,
        )?;
    }
    Ok(())
}

/// Each service's health check: healthy or not, how often it ran and failed, how often it
/// flipped, and how long checks took.
fn service_series(f: &mut Families, checks: &[ServiceCheckDoc]) -> Result<(), prometheus::Error> {
    for check in checks {
        let service = [check.name.as_str()];
        f.int_gauge(
            "clawnode_service_healthy",
            "1 while the service passes its check and, where it requires GPUs, a GPU is usable.",
            &["service"],
            &service,
            i64::from(check.state == "healthy"),
        )?;
        // Healthy is not enough to be offered: the mesh must be up and have taken the publish.
        f.int_gauge(
            "clawnode_service_advertised",
            "1 while the mesh provider holds the service's advertisement (the last publish succeeded and carried it).",
            &["service"],
            &service,
            i64::from(check.advertised),
        )?;
        for (result, count) in [
            ("ok", check.checks.saturating_sub(check.failures)),
            ("fail", check.failures),
        ] {
            f.counter(
                "clawnode_service_checks_total",
                "Health checks run, by result.",
                &["service", "result"],
                &[check.name.as_str(), result],
                count,
            )?;
        }
        f.counter(
            "clawnode_service_transitions_total",
            "Changes between healthy and unhealthy.",
            &["service"],
            &service,
            check.transitions,
        )?;
    }
    if !checks.is_empty() {
        f.register(CheckDurations::new(checks)?)?;
    }
    Ok(())
}

/// `clawnode_service_check_duration_seconds`: the core keeps the buckets; this only exposes
/// them as a histogram family (prometheus's own `Histogram` can only be observed into).
struct CheckDurations {
    desc: Desc,
    family: MetricFamily,
}

impl CheckDurations {
    const NAME: &str = "clawnode_service_check_duration_seconds";
    const HELP: &str = "How long health checks took.";

    fn new(checks: &[ServiceCheckDoc]) -> Result<Self, prometheus::Error> {
        let desc = Desc::new(
            Self::NAME.into(),
            Self::HELP.into(),
            vec!["service".into()],
            Default::default(),
        )?;
        let mut family = MetricFamily::default();
        family.set_name(Self::NAME.into());
        family.set_help(Self::HELP.into());
        family.set_field_type(MetricType::HISTOGRAM);
        for check in checks {
            let mut label = LabelPair::default();
            label.set_name("service".into());
            label.set_value(check.name.clone());
            let buckets = DURATION_BUCKETS
                .iter()
                .enumerate()
                .map(|(i, &upper)| {
                    let mut bucket = proto::Bucket::default();
                    bucket.set_upper_bound(upper);
                    bucket
                        .set_cumulative_count(check.durations.buckets.get(i).copied().unwrap_or(0));
                    bucket
                })
                .collect();
            let mut histogram = proto::Histogram::default();
            histogram.set_bucket(buckets);
            histogram.set_sample_count(check.checks);
            histogram.set_sample_sum(check.durations.sum_us as f64 / 1e6);
            let mut metric = proto::Metric::default();
            metric.set_label(vec![label]);
            metric.set_histogram(histogram);
            family.mut_metric().push(metric);
        }
        Ok(Self { desc, family })
    }
}

impl Collector for CheckDurations {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        vec![self.family.clone()]
    }
}

/// A node's gateway connection: whether a gateway answers, how old the cursor is, and how
/// many answers of each kind were applied.
fn gateway_series(f: &mut Families, gateway: &GatewayDoc) -> Result<(), prometheus::Error> {
    f.int_gauge(
        "clawnode_gateway_connected",
        "1 while a gateway answers the node's long poll (0: running on the cached peer set).",
        &[],
        &[],
        i64::from(gateway.state == "live"),
    )?;
    if let Some(age) = gateway.cursor_age_s {
        f.gauge(
            "clawnode_gateway_cursor_age_seconds",
            "Seconds since a gateway last answered.",
            &[],
            &[],
            age as f64,
        )?;
    }
    for (kind, count) in [("snapshot", gateway.snapshots), ("delta", gateway.deltas)] {
        f.counter(
            "clawnode_gateway_updates_total",
            "Gateway answers applied, by kind.",
            &["kind"],
            &[kind],
            count,
        )?;
    }
    f.int_gauge(
        "clawnode_gateway_peers",
        "Peers the gateways authorise (this node excluded).",
        &[],
        &[],
        gateway.peers as i64,
    )?;
    Ok(())
}

/// How many tailnet peers each path takes: every path is present (0 included) so a rate or
/// ratio over them never has gaps, DERP also by region.
fn path_series(f: &mut Families, paths: &PathsDoc) -> Result<(), prometheus::Error> {
    for kind in PathKind::ALL {
        f.int_gauge(
            "clawnode_tailscale_peers",
            "Tailnet peers by the path their traffic takes now (idle: no traffic lately).",
            &["path"],
            &[kind.label()],
            paths.counts.count(kind) as i64,
        )?;
    }
    for (region, n) in &paths.counts.derp {
        f.int_gauge(
            "clawnode_tailscale_derp_peers",
            "Active tailnet peers reached through DERP, by region.",
            &["region"],
            &[region.as_str()],
            *n as i64,
        )?;
    }
    let hinted = paths.peers.iter().filter(|p| p.hint.is_some()).count();
    f.int_gauge(
        "clawnode_tailscale_derp_peers_with_relay_available",
        "Peers on DERP although a peer relay is available (see `clawnode status`).",
        &[],
        &[],
        hinted as i64,
    )?;
    Ok(())
}

/// The gateway role this node runs (`[gateway] enabled`): what it serves, to how many.
fn gateway_role_series(f: &mut Families, role: &RoleDoc) -> Result<(), prometheus::Error> {
    f.int_gauge(
        "clawnode_gateway_role_sessions",
        "Nodes with a session at this gateway.",
        &[],
        &[],
        role.sessions as i64,
    )?;
    f.int_gauge(
        "clawnode_gateway_role_revision",
        "The newest revision of the peer set this gateway serves.",
        &[],
        &[],
        role.rev as i64,
    )?;
    f.int_gauge(
        "clawnode_gateway_role_store_writable",
        "1 while the gateway's store takes joins and changes (0: etcd without quorum).",
        &["store"],
        &[role.store.kind.as_str()],
        i64::from(role.store.writable),
    )?;
    for (kind, count) in [
        ("snapshot", role.snapshots_sent),
        ("delta", role.deltas_sent),
        ("empty", role.empty_polls),
    ] {
        f.counter(
            "clawnode_gateway_role_answers_total",
            "Long-poll answers sent, by kind (empty: the wait ran out with nothing new).",
            &["kind"],
            &[kind],
            count,
        )?;
    }
    for (name, help, value) in [
        (
            "clawnode_gateway_role_sent_bytes_total",
            "Bytes of long-poll answers sent (after compression).",
            role.bytes_sent,
        ),
        (
            "clawnode_gateway_role_encodings_total",
            "Answers encoded; each is shared by every node waiting on it.",
            role.encodings,
        ),
        (
            "clawnode_gateway_role_joins_total",
            "Nodes joined with a token.",
            role.joins,
        ),
        (
            "clawnode_gateway_role_refused_busy_total",
            "Requests answered 503 because the gateway was at capacity.",
            role.refused_busy,
        ),
    ] {
        f.counter(name, help, &[], &[], value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuInventory, GpuMetrics, XidEvent};

    fn snapshot() -> Snapshot {
        let gpu = |index: u32| GpuInfo {
            index,
            uuid: Some(format!("GPU-{index}")),
            name: Some("NVIDIA H100 80GB HBM3".into()),
            pci_bus_id: Some(format!("00000000:1{index}:00.0")),
            ..GpuInfo::default()
        };
        let mut snap = Snapshot {
            inventory: GpuInventory {
                gpus: vec![gpu(0), gpu(1)],
                ..GpuInventory::default()
            },
            metrics: vec![
                GpuMetrics {
                    index: 0,
                    temperature_celsius: Some(41),
                    energy_millijoules: Some(123456),
                    ..GpuMetrics::default()
                },
                GpuMetrics {
                    index: 1,
                    lost: true,
                    ..GpuMetrics::default()
                },
            ],
            ..Snapshot::default()
        };
        snap.xids.handle_xid(XidEvent { index: 0, code: 79 }, 5000);
        snap
    }

    #[test]
    fn a_gateway_node_exports_its_sessions_answers_and_refusals() {
        let status = StatusDoc {
            gateway_role: Some(RoleDoc {
                store_id: "00000000000000aa".into(),
                rev: 812,
                sessions: 1000,
                connections: 1003,
                snapshots_sent: 1000,
                deltas_sent: 5200,
                empty_polls: 77,
                bytes_sent: 123_456,
                encodings: 40,
                joins: 1000,
                refused_busy: 3,
                store: Default::default(),
            }),
            ..StatusDoc::default()
        };
        let text = render(&status, &[], None, None, &Snapshot::default(), "gw-01", 0).unwrap();
        for line in [
            "clawnode_gateway_role_sessions 1000",
            "clawnode_gateway_role_revision 812",
            "clawnode_gateway_role_store_writable{store=\"sqlite\"} 1",
            "clawnode_gateway_role_answers_total{kind=\"delta\"} 5200",
            "clawnode_gateway_role_answers_total{kind=\"empty\"} 77",
            "clawnode_gateway_role_sent_bytes_total 123456",
            "clawnode_gateway_role_encodings_total 40",
            "clawnode_gateway_role_refused_busy_total 3",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        let plain = plain();
        assert!(!plain.contains("gateway_role"), "{plain}");
    }

    #[test]
    fn tailnet_peers_are_counted_by_path_with_every_path_present() {
        let status: crate::mesh::tailscale::types::Status = serde_json::from_str(include_str!(
            "../../tests/fixtures/tailscale/status-mixed-paths.json"
        ))
        .unwrap();
        let paths = crate::mesh::tailscale::status::paths_doc(&status, false).unwrap();
        let text = render(
            &StatusDoc::default(),
            &[],
            None,
            Some(&paths),
            &Snapshot::default(),
            "n",
            0,
        )
        .unwrap();
        for line in [
            "clawnode_tailscale_peers{path=\"direct\"} 9",
            "clawnode_tailscale_peers{path=\"peer_relay\"} 2",
            "clawnode_tailscale_peers{path=\"derp\"} 1",
            "clawnode_tailscale_peers{path=\"unknown\"} 0",
            "clawnode_tailscale_peers{path=\"idle\"} 2",
            "clawnode_tailscale_peers{path=\"offline\"} 1",
            "clawnode_tailscale_derp_peers{region=\"fra\"} 1",
            "clawnode_tailscale_derp_peers_with_relay_available 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        promtool_accepts(&text);
        let plain = plain();
        assert!(!plain.contains("clawnode_tailscale"), "{plain}");
    }

    #[test]
    fn a_node_on_its_cached_peer_set_shows_the_gateway_disconnected_with_the_cursor_age() {
        let cached = GatewayDoc {
            url: Some("https://203.0.113.1:443".into()),
            state: "cached".into(),
            cursor: Some("0000000000000007.42".into()),
            cursor_age_s: Some(95),
            since: 1_800_000_000,
            peers: 3,
            snapshots: 1,
            deltas: 41,
            ..GatewayDoc::default()
        };
        let text = render(
            &StatusDoc::default(),
            &[],
            Some(&cached),
            None,
            &Snapshot::default(),
            "gpu-01",
            0,
        )
        .unwrap();
        assert!(text.contains("clawnode_gateway_connected 0"), "{text}");
        assert!(
            text.contains("clawnode_gateway_cursor_age_seconds 95"),
            "{text}"
        );
        assert!(
            text.contains("clawnode_gateway_updates_total{kind=\"delta\"} 41"),
            "{text}"
        );
        assert!(
            text.contains("clawnode_gateway_updates_total{kind=\"snapshot\"} 1"),
            "{text}"
        );
        assert!(text.contains("clawnode_gateway_peers 3"), "{text}");
        let live = GatewayDoc {
            state: "live".into(),
            ..cached
        };
        let text = render(
            &StatusDoc::default(),
            &[],
            Some(&live),
            None,
            &Snapshot::default(),
            "gpu-01",
            0,
        )
        .unwrap();
        assert!(text.contains("clawnode_gateway_connected 1"), "{text}");
        // A node without a gateway has no gateway series.
        let text = render(
            &StatusDoc::default(),
            &[],
            None,
            None,
            &Snapshot::default(),
            "gpu-01",
            0,
        )
        .unwrap();
        assert!(!text.contains("clawnode_gateway_"), "{text}");
    }

    fn check(name: &str, healthy: bool, checks: u64, failures: u64) -> ServiceCheckDoc {
        ServiceCheckDoc {
            name: name.into(),
            state: if healthy { "healthy" } else { "unhealthy" }.into(),
            advertised: healthy,
            check: "tcp 127.0.0.1:8443".into(),
            checks,
            failures,
            transitions: 2,
            durations: super::super::DurationHistogram {
                // Cumulative: 1 check within 1 ms, 3 within 2.5 ms, all within 5 ms.
                buckets: std::iter::once(1)
                    .chain(std::iter::once(3))
                    .chain(std::iter::repeat_n(checks, DURATION_BUCKETS.len() - 2))
                    .collect(),
                sum_us: 12_500,
            },
            ..ServiceCheckDoc::default()
        }
    }

    #[test]
    fn each_service_exports_its_health_check_counts_and_a_duration_histogram() {
        let mut status = StatusDoc::default();
        status.services.checks = vec![
            check("gateway", true, 10, 1),
            check("molt-provider", false, 4, 4),
            // Healthy while the mesh is down: passes its check, not advertised.
            ServiceCheckDoc {
                advertised: false,
                ..check("web", true, 3, 0)
            },
        ];
        let text = render(&status, &[], None, None, &Snapshot::default(), "n", 0).unwrap();
        for line in [
            "clawnode_service_healthy{service=\"gateway\"} 1",
            "clawnode_service_healthy{service=\"molt-provider\"} 0",
            "clawnode_service_healthy{service=\"web\"} 1",
            "clawnode_service_advertised{service=\"gateway\"} 1",
            "clawnode_service_advertised{service=\"molt-provider\"} 0",
            "clawnode_service_advertised{service=\"web\"} 0",
            "clawnode_service_checks_total{result=\"ok\",service=\"gateway\"} 9",
            "clawnode_service_checks_total{result=\"fail\",service=\"gateway\"} 1",
            "clawnode_service_checks_total{result=\"ok\",service=\"molt-provider\"} 0",
            "clawnode_service_checks_total{result=\"fail\",service=\"molt-provider\"} 4",
            "clawnode_service_transitions_total{service=\"gateway\"} 2",
            "# TYPE clawnode_service_check_duration_seconds histogram",
            "clawnode_service_check_duration_seconds_bucket{service=\"gateway\",le=\"0.001\"} 1",
            "clawnode_service_check_duration_seconds_bucket{service=\"gateway\",le=\"+Inf\"} 10",
            "clawnode_service_check_duration_seconds_sum{service=\"gateway\"} 0.0125",
            "clawnode_service_check_duration_seconds_count{service=\"molt-provider\"} 4",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A config without services has none of these series.
        let plain = plain();
        assert!(!plain.contains("clawnode_service_"), "{plain}");
        promtool_accepts(&text);
    }

    /// A node with nothing configured: no services, gateway or tailnet.
    fn plain() -> String {
        render(
            &StatusDoc::default(),
            &[],
            None,
            None,
            &Snapshot::default(),
            "n",
            0,
        )
        .unwrap()
    }

    /// `promtool check metrics` where it is installed (tests/run-all.sh installs it).
    fn promtool_accepts(text: &str) {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let Ok(mut child) = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            eprintln!("promtool not installed: exposition not linted");
            return;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn gpu_series_use_dcgm_names_and_labels_and_skip_what_nvml_did_not_answer() {
        let text = render(
            &StatusDoc::default(),
            &[],
            None,
            None,
            &snapshot(),
            "gpu-01",
            0,
        )
        .unwrap();
        assert!(text.contains("# TYPE DCGM_FI_DEV_GPU_TEMP gauge"), "{text}");
        assert!(text.contains(
            "DCGM_FI_DEV_GPU_TEMP{Hostname=\"gpu-01\",UUID=\"GPU-0\",device=\"nvidia0\",gpu=\"0\",modelName=\"NVIDIA H100 80GB HBM3\",pci_bus_id=\"00000000:10:00.0\"} 41"
        ), "{text}");
        assert!(text.contains("# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter"));
        assert!(!text.contains("DCGM_FI_DEV_GPU_UTIL"), "unanswered: absent");
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("DCGM_FI_DEV_") && l.contains("UUID=\"GPU-1\"")),
            "a lost GPU has no readings: {text}"
        );
        assert!(
            text.contains("clawnode_gpu_lost{device=\"nvidia1\",gpu=\"1\",hostname=\"gpu-01\""),
            "{text}"
        );
        assert!(text.contains("xid=\"79\"} 1"), "{text}");
        assert!(text.contains("DCGM_FI_DEV_XID_ERRORS{"), "{text}");
        assert!(text.contains("clawnode_ready 0"));
        assert!(text.contains("clawnode_gpus 2"));
    }
}
