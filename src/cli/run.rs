//! `clawnode run`: the daemon.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{self, ProviderKind};
use crate::gpu::NvmlProbe;
use crate::supervisor::{Components, Daemon, mesh_provider};
use crate::systemd::SdNotifier;
use crate::{api, logging, mesh, state};

use super::CliError;

pub fn run(config_path: &Path) -> Result<ExitCode, CliError> {
    // wireguard-control starts a userspace daemon by itself when its UAPI socket is missing;
    // clawnode supervises its own, so that fallback must fail instead of double-forking one.
    // SAFETY: called before any thread exists (the runtime is built below).
    unsafe { std::env::set_var("WG_USERSPACE_IMPLEMENTATION", "/bin/false") };
    let config = config::load(config_path)?;
    if config.network.provider == ProviderKind::Wireguard && !crate::systemd::has_cap_net_admin() {
        return Err(CliError::runtime(NeedsCapability));
    }
    let log = logging::init(config.log.level.as_str());
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config_path.display(),
        node = %config.node.name,
        provider = %config.network.provider,
        "clawnode starting"
    );
    state::ensure_private_dir(&config.node.state_dir).map_err(CliError::runtime)?;
    std::fs::create_dir_all(&config.node.runtime_dir).map_err(CliError::runtime)?;

    // One malloc arena: glibc gives every thread that allocates its own, and the GPU monitor
    // and blocking-pool threads would each keep one resident for a few allocations.
    // SAFETY: called before any other thread exists; it only sets an allocator limit.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // One thread is plenty for an agent that mostly waits; NVML runs on the GPU monitor's own
    // thread, other blocking work on the blocking pool, whose threads exit when idle.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    // The gateway role, when enabled, beside the mesh: on its own thread and runtime. Started
    // before the mesh so this node's own record and session are in place when it joins.
    let gateway = if config.gateway.enabled {
        let own_key =
            mesh::wireguard::keys::load_or_generate(&config.network.wireguard.private_key_file)
                .map_err(CliError::runtime)?
                .public();
        let started = crate::gateway::spawn(config.clone(), own_key).map_err(|e| {
            if e.transient {
                CliError::runtime(e)
            } else {
                CliError::NeedsOperator(Box::new(e))
            }
        })?;
        Some(started)
    } else {
        None
    };
    let code = runtime.block_on(async {
        if config.network.provider == ProviderKind::Tailscale {
            mesh::tailscale::access::check_write_access(&config.network.tailscale.socket)
                .await
                .map_err(|e| CliError::NeedsOperator(Box::new(e)))?;
        }
        let listener = api::bind(&config.api.socket, config.api.socket_group.as_deref())
            .await
            .map_err(CliError::runtime)?;
        tracing::info!(component = "api", socket = %config.api.socket.display(), "status API listening");
        let (hooks, recheck_rx) = mesh::Hooks::new();
        let live = hooks.live.clone();
        let metrics_listener = match config.api.metrics_listen {
            Some(addr) => {
                if !addr.ip().is_loopback() {
                    // /metrics has no authentication: anyone who can reach this address reads
                    // the node's GPUs, peers and errors.
                    tracing::warn!(component = "api", listen = %addr, "metrics_listen is reachable beyond loopback and /metrics has no authentication; restrict it with a firewall or listen on 127.0.0.1");
                }
                Some(
                    crate::http::bind_free(addr)
                        .map_err(|e| CliError::runtime(MetricsBind(addr, e)))?,
                )
            }
            None => None,
        };
        let components = Components {
            mesh: mesh_provider(&config, hooks.clone()),
            hooks: (hooks, recheck_rx),
            gpu: Box::new(NvmlProbe::new(config.gpu.nvml_library.clone())),
            notifier: Box::new(SdNotifier::default()),
            watchdog_interval: SdNotifier::watchdog_interval(),
        };
        let socket = config.api.socket.clone();
        let daemon = Daemon::new(config_path.to_path_buf(), config, components, Some(log));
        let mut sources = api::Sources::new(daemon.status(), live, daemon.gpus());
        if let Some(role) = &gateway {
            sources = sources.with_gateway_role(role.view.clone());
        }
        let metrics_task = metrics_listener.map(|l| {
            tracing::info!(component = "api", listen = %config_metrics(&l), "metrics listening");
            tokio::spawn(api::serve_metrics(l, sources.clone()))
        });
        let api_task = tokio::spawn(api::serve(listener, sources));
        let code = daemon.run().await.map_err(CliError::runtime);
        api_task.abort();
        if let Some(task) = metrics_task {
            task.abort();
        }
        let _ = std::fs::remove_file(&socket);
        code
    })?;
    drop(gateway);
    Ok(ExitCode::from(code))
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the wireguard provider needs CAP_NET_ADMIN to manage its interface: run clawnode as root or through its systemd unit"
)]
struct NeedsCapability;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on [api] metrics_listen {0}: {1}")]
struct MetricsBind(std::net::SocketAddr, std::io::Error);

fn config_metrics(listener: &tokio::net::TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
}
