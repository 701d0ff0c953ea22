//! The userspace backend's daemon: clawnode spawns `wireguard-go -f <iface>` (or any UAPI
//! implementation) itself, so it knows the PID, reaps it, notices when it dies and stops it.
//! wireguard-control is then only the UAPI client.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} exited ({status}) before its UAPI socket {socket} appeared")]
    Exited {
        program: String,
        status: String,
        socket: PathBuf,
    },
    #[error("{program} did not create its UAPI socket {socket} within {seconds} s")]
    NoSocket {
        program: String,
        socket: PathBuf,
        seconds: u64,
    },
}

/// Where UAPI sockets live: the same rule wireguard-tools and wireguard-control use.
pub fn socket_dir() -> PathBuf {
    if Path::new("/var/run/wireguard").is_dir() {
        PathBuf::from("/var/run/wireguard")
    } else {
        PathBuf::from("/run/wireguard")
    }
}

pub fn socket_path(iface: &str) -> PathBuf {
    socket_dir().join(format!("{iface}.sock"))
}

/// Is there a UAPI implementation to run? A bare name is looked up in PATH.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// Does something answer on the UAPI socket of `iface`? A daemon that is not clawnode's may
/// (another namespace shares the socket directory); deleting its socket would end it.
pub fn socket_answers(iface: &str) -> bool {
    std::os::unix::net::UnixStream::connect(socket_path(iface)).is_ok()
}

/// A supervised userspace WireGuard daemon for one interface.
pub struct Daemon {
    iface: String,
    program: PathBuf,
    running: Option<Running>,
}

/// The daemon's state lives here from the moment it is spawned, so a join aborted while
/// waiting for its socket (a stop) leaves it to `stop`, never orphaned.
struct Running {
    pid: Option<u32>,
    exited: watch::Receiver<bool>,
    stop: oneshot::Sender<()>,
    reaper: JoinHandle<()>,
}

const SOCKET_WAIT: Duration = Duration::from_secs(5);

impl Daemon {
    pub fn new(iface: &str, program: &Path) -> Self {
        Self {
            iface: iface.to_string(),
            program: program.to_path_buf(),
            running: None,
        }
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().and_then(|r| r.pid)
    }

    /// Spawned by this process and not exited.
    pub fn is_running(&self) -> bool {
        self.running.as_ref().is_some_and(|r| !*r.exited.borrow())
    }

    /// Becomes true when the running daemon exits on its own; `None` if none runs.
    pub fn exited(&self) -> Option<watch::Receiver<bool>> {
        self.running.as_ref().map(|r| r.exited.clone())
    }

    /// Start the daemon unless ours is running with its socket in place.
    pub async fn ensure_running(&mut self) -> Result<(), DaemonError> {
        let socket = socket_path(&self.iface);
        if let Some(running) = &self.running
            && !*running.exited.borrow()
            && socket.exists()
        {
            return Ok(());
        }
        // Dead, or alive without its socket (deleted, wedged): replace it.
        self.stop().await;
        // A stale socket from a crashed daemon would make the new one fail to listen.
        let _ = std::fs::remove_file(&socket);
        let program = self.program.display().to_string();
        let mut child = Command::new(&self.program)
            .arg("-f")
            .arg(&self.iface)
            // Keep wireguard-go from daemonising or changing its verbosity behind our back.
            .env_remove("WG_PROCESS_FOREGROUND")
            .env_remove("LOG_LEVEL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Not killed on drop: with keep_interface_on_stop the daemon must outlive clawnode.
            // `stop` is the one way it is ended.
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| DaemonError::Spawn {
                program: program.clone(),
                source,
            })?;
        let pid = child.id();
        if let Some(stderr) = child.stderr.take() {
            let iface = self.iface.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(component = "mesh", interface = %iface, "wireguard-go: {line}");
                }
            });
        }
        tracing::info!(component = "mesh", interface = %self.iface, program = %program, pid, "started userspace WireGuard");
        let (exited_tx, mut exited) = watch::channel(false);
        let status = Arc::new(OnceLock::new());
        let (stop, stop_rx) = oneshot::channel();
        let iface = self.iface.clone();
        let reaper = tokio::spawn(reap(child, iface, exited_tx, Arc::clone(&status), stop_rx));
        self.running = Some(Running {
            pid,
            exited: exited.clone(),
            stop,
            reaper,
        });
        let started = Instant::now();
        while !socket.exists() {
            if *exited.borrow_and_update() {
                self.running = None;
                return Err(DaemonError::Exited {
                    program,
                    status: status.get().cloned().unwrap_or_default(),
                    socket,
                });
            }
            if started.elapsed() > SOCKET_WAIT {
                self.stop().await;
                return Err(DaemonError::NoSocket {
                    program,
                    socket,
                    seconds: SOCKET_WAIT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Stop the daemon (SIGTERM, SIGKILL after a second) and wait for it. Its tun device goes
    /// with it.
    pub async fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        let _ = running.stop.send(());
        let _ = running.reaper.await;
        let _ = std::fs::remove_file(socket_path(&self.iface));
    }
}

/// Owns the child: reaps it when it exits, or stops it when asked.
async fn reap(
    mut child: Child,
    iface: String,
    exited: watch::Sender<bool>,
    status: Arc<OnceLock<String>>,
    stop: oneshot::Receiver<()>,
) {
    tokio::select! {
        result = child.wait() => {
            tracing::warn!(component = "mesh", interface = %iface, status = ?result, "userspace WireGuard daemon exited");
            let _ = status.set(match result {
                Ok(s) => s.to_string(),
                Err(error) => error.to_string(),
            });
            exited.send_replace(true);
        }
        _ = stop => {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(1), child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}
