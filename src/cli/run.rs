//! `clawnode run`: the daemon.

use std::path::Path;
use std::process::ExitCode;

use crate::config;
use crate::gpu::NvmlProbe;
use crate::supervisor::{Components, Daemon};
use crate::systemd::SdNotifier;
use crate::{api, logging, mesh, state};

use super::CliError;

pub fn run(config_path: &Path) -> Result<ExitCode, CliError> {
    let config = config::load(config_path)?;
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

    // One thread is plenty for an agent that mostly waits; blocking work (NVML) goes to the
    // blocking pool, whose threads exit when idle.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    let code = runtime.block_on(async {
        let listener = api::bind(&config.api.socket, config.api.socket_group.as_deref())
            .await
            .map_err(CliError::runtime)?;
        tracing::info!(component = "api", socket = %config.api.socket.display(), "status API listening");
        let components = Components {
            mesh: mesh::for_config(&config),
            gpu: Box::new(NvmlProbe::new(config.gpu.nvml_library.clone())),
            notifier: Box::new(SdNotifier),
            watchdog_interval: SdNotifier::watchdog_interval(),
        };
        let socket = config.api.socket.clone();
        let daemon = Daemon::new(config_path.to_path_buf(), config, components, Some(log));
        let api_task = tokio::spawn(api::serve(listener, daemon.status()));
        let code = daemon.run().await.map_err(CliError::runtime);
        api_task.abort();
        let _ = std::fs::remove_file(&socket);
        code
    })?;
    Ok(ExitCode::from(code))
}
