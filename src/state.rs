//! The state directory: crash-safe writes with the right modes.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The WireGuard private key's default name under `state_dir`.
pub const WIREGUARD_KEY: &str = "wireguard.key";
/// The Tailscale services clawnode advertised (so it withdraws only its own).
pub const TAILSCALE_SERVICES: &str = "tailscale-services.json";
/// The peer relay port clawnode set in tailscaled's prefs (so it clears only its own).
pub const TAILSCALE_RELAY: &str = "tailscale-relay.json";
/// Certificates fetched for services: `<domain>.crt` and `<domain>.key`.
pub const CERTS_DIR: &str = "certs";
/// The WireGuard interface clawnode created (so it never configures or deletes another's).
pub const WIREGUARD_INTERFACE: &str = "wireguard-interface.json";
/// The node's gateway session (bearer credential, assigned address, gateways, cursor).
pub const GATEWAY_SESSION: &str = "gateway-session.json";
/// The last verified gateway peer set, applied before any gateway is reached.
pub const PEERSET_CACHE: &str = "peerset.json";
/// Every name clawnode writes under `state_dir` (plus `.<name>.tmp.*` while writing): the
/// packages' purge removes these and nothing else, so a new one must be added there too.
pub const STATE_NAMES: &[&str] = &[
    WIREGUARD_KEY,
    TAILSCALE_SERVICES,
    TAILSCALE_RELAY,
    CERTS_DIR,
    WIREGUARD_INTERFACE,
    GATEWAY_SESSION,
    PEERSET_CACHE,
];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Create `dir` (and any missing parents) private, 0700: it holds keys. Only the directories
/// created here get that mode: an existing one is left as the operator made it (a `state_dir`
/// of `/var/lib` must not turn `/var/lib` private), with a warning if others may write to it.
pub fn ensure_private_dir(dir: &Path) -> Result<(), StateError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            warn_if_shared(dir, meta.permissions().mode());
            Ok(())
        }
        Ok(_) => Err(not_a_directory(dir)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => create_private(dir),
        Err(source) => Err(io_err("inspect", dir, source)),
    }
}

/// Create `dir` with mode 0700, and its missing parents the same way.
fn create_private(dir: &Path) -> Result<(), StateError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        match fs::metadata(parent) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(not_a_directory(parent)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => create_private(parent)?,
            Err(source) => return Err(io_err("inspect", parent, source)),
        }
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        // The umask may have narrowed the mode at creation; set it exactly.
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|source| io_err("set mode 0700 on", dir, source)),
        // Another process created it in the meantime: it is theirs, as they made it.
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(source) => Err(io_err("create directory", dir, source)),
    }
}

fn not_a_directory(path: &Path) -> StateError {
    io_err(
        "create directory",
        path,
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            "it exists and is not a directory",
        ),
    )
}

fn warn_if_shared(dir: &Path, mode: u32) {
    if mode & 0o022 != 0 {
        tracing::warn!(
            path = %dir.display(),
            mode = format_args!("{:04o}", mode & 0o7777),
            "the state directory exists and other users may write to it; clawnode leaves its mode alone"
        );
    }
}

/// Replace `path` with `bytes` atomically: a reader sees the old file or the new one, never a
/// torn one, even across a crash. The data is written to a temporary file created with `mode`,
/// fsynced, renamed over `path`, and the directory is fsynced so the rename is durable.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    let (dir, tmp) = beside(path);
    let result = write_synced(&tmp, bytes, mode).and_then(|()| {
        fs::rename(&tmp, path).map_err(|source| io_err("rename into", path, source))?;
        sync_dir(dir)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Store `bytes` at `path` only if nothing is there yet, and whole: they are written and fsynced
/// to a temporary file created with `mode`, which is then hard-linked to `path` (an exclusive,
/// atomic step). Returns `false`, writing nothing, if `path` already existed.
pub fn create_exclusive(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, StateError> {
    let (dir, tmp) = beside(path);
    let result = write_synced(&tmp, bytes, mode).and_then(|()| {
        match fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(source) => return Err(io_err("link into", path, source)),
        }
        sync_dir(dir)?;
        Ok(true)
    });
    let _ = fs::remove_file(&tmp);
    result
}

/// The directory `path` is in, and a fresh temporary name there.
fn beside(path: &Path) -> (&Path, PathBuf) {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = temporary_beside(dir, &name);
    (dir, tmp)
}

/// Write `bytes` to `tmp` with exactly `mode` and fsync them. The name is this process's own;
/// a file left there by a crashed process that had the same pid is overwritten.
fn write_synced(tmp: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)
        .map_err(|source| io_err("create", tmp, source))?;
    // The umask may have narrowed the mode at creation; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|source| io_err("set mode on", tmp, source))?;
    give_to_directory_owner(&file, tmp);
    file.write_all(bytes)
        .map_err(|source| io_err("write", tmp, source))?;
    file.sync_all()
        .map_err(|source| io_err("fsync", tmp, source))
}

/// Root writing into a directory another user owns (`clawnode pubkey` run by root before the
/// daemon, which runs as the clawbernetes user, first made its key) gives the file to that
/// user, or the daemon could not read its own state. Best effort: without CAP_CHOWN the file
/// stays root's and the daemon's read error names it.
fn give_to_directory_owner(file: &File, tmp: &Path) {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let Some(dir) = tmp.parent().and_then(|d| fs::metadata(d).ok()) else {
        return;
    };
    if dir.uid() != 0 {
        let _ = std::os::unix::fs::fchown(file, Some(dir.uid()), Some(dir.gid()));
    }
}

/// Make a rename or link in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| io_err("fsync", dir, source))
}

/// A temporary name in `dir` no other writer uses: this process's id and a per-process counter,
/// so threads writing the same file at once do not share one.
fn temporary_beside(dir: &Path, name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

fn io_err(action: &'static str, path: &Path, source: io::Error) -> StateError {
    StateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_written_with_mode_0600_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wireguard.key");
        write_atomic(&path, b"secret", 0o600).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }

    #[test]
    fn rewriting_replaces_the_whole_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owned.json");
        write_atomic(&path, b"a much longer first version", 0o644).unwrap();
        write_atomic(&path, b"v2", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"v2");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_file_root_creates_in_a_directory_another_user_owns_belongs_to_that_user() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        let key = dir.path().join("wireguard.key");
        assert!(create_exclusive(&key, b"k", 0o600).unwrap());
        let meta = fs::metadata(&key).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let own = dir.path().join("own");
        fs::create_dir(&own).unwrap();
        write_atomic(&own.join("x"), b"x", 0o600).unwrap();
        assert_eq!(
            fs::metadata(own.join("x")).unwrap().uid(),
            0,
            "root's own dir"
        );
    }

    #[test]
    fn state_dir_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("var/lib/clawbernetes");
        ensure_private_dir(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn an_existing_state_dir_keeps_the_mode_the_operator_gave_it() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("lib");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&shared).unwrap();
        let mode = fs::metadata(&shared).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
    }

    #[test]
    fn a_new_state_dir_is_private_and_its_existing_parent_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("lib");
        fs::create_dir(&parent).unwrap();
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o755)).unwrap();
        let state = parent.join("clawbernetes/state");
        ensure_private_dir(&state).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&parent), 0o755);
        assert_eq!(mode(&parent.join("clawbernetes")), 0o700);
        assert_eq!(mode(&state), 0o700);
    }

    #[test]
    fn a_state_dir_path_that_is_a_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state");
        fs::write(&file, b"").unwrap();
        let err = ensure_private_dir(&file).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn a_failed_write_reports_the_path() {
        let err = write_atomic(Path::new("/nonexistent-dir/x/key"), b"k", 0o600).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/x"));
    }
}
