//! The state directory: crash-safe writes with the right modes.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Create `dir` (and parents) if missing and make it private (0700): it holds keys.
pub fn ensure_private_dir(dir: &Path) -> Result<(), StateError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| io_err("create directory", dir, source))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|source| io_err("set mode 0700 on", dir, source))
}

/// Replace `path` with `bytes` atomically: a reader sees the old file or the new one, never a
/// torn one, even across a crash. The data is written to a temporary file created with `mode`,
/// fsynced, renamed over `path`, and the directory is fsynced so the rename is durable.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|source| io_err("create", &tmp, source))?;
        // The umask may have narrowed the mode at creation; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|source| io_err("set mode on", &tmp, source))?;
        file.write_all(bytes)
            .map_err(|source| io_err("write", &tmp, source))?;
        file.sync_all()
            .map_err(|source| io_err("fsync", &tmp, source))?;
        fs::rename(&tmp, path).map_err(|source| io_err("rename into", path, source))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| io_err("fsync", dir, source))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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
    fn state_dir_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("var/lib/clawbernetes");
        ensure_private_dir(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_failed_write_reports_the_path() {
        let err = write_atomic(Path::new("/nonexistent-dir/x/key"), b"k", 0o600).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/x"));
    }
}
