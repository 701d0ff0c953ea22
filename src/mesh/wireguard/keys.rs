//! WireGuard keys at rest: the node's private key (generated on first start, 0600) and
//! per-peer preshared keys. Private material is zeroized and never printed.

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use wireguard_control::Key;
use zeroize::{Zeroize, Zeroizing};

use crate::core::peer_diff::{PeerKey, Psk};
use crate::state;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    // Never includes the file's content.
    #[error(
        "key file {path} does not hold a base64 WireGuard key (44 characters, as `wg genkey` writes)"
    )]
    Malformed { path: PathBuf },
    #[error("cannot store the generated private key: {0}")]
    Write(#[from] state::StateError),
}

/// The node's private key.
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    pub fn generate() -> Self {
        let mut key = Key::generate_private();
        let out = Self(key.0);
        key.0.zeroize();
        out
    }

    /// A key from its 32 raw bytes (as `wg genkey` writes them, before base64).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn public(&self) -> PeerKey {
        let mut private = Key(self.0);
        let public = private.get_public();
        private.0.zeroize();
        PeerKey(public.0)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn from_base64(text: &str) -> Option<Self> {
        let mut key = Key::from_base64(text.trim()).ok()?;
        let out = Self(key.0);
        key.0.zeroize();
        Some(out)
    }

    fn to_base64(&self) -> Zeroizing<String> {
        let mut key = Key(self.0);
        let text = Zeroizing::new(key.to_base64());
        key.0.zeroize();
        text
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// Read the private key at `path`, or generate one there (mode 0600) if there is none yet.
///
/// Creation is exclusive: the key is written whole to a temporary file and hard-linked into
/// place, which fails if `path` appeared meanwhile. So `clawnode pubkey` racing the daemon's
/// first start (or any two callers) end up with the one key that won, never two.
pub fn load_or_generate(path: &Path) -> Result<PrivateKey, KeyError> {
    match read_private(path) {
        Err(KeyError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        found => return found,
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        state::ensure_private_dir(dir)?;
    }
    let key = PrivateKey::generate();
    let mut text = key.to_base64();
    text.push('\n');
    if !state::create_exclusive(path, text.as_bytes(), 0o600)? {
        // Another process (or thread) stored its key first: that one is the node's key.
        return read_private(path);
    }
    tracing::info!(component = "mesh", path = %path.display(), public_key = %to_base64(&key.public()), "generated a new WireGuard private key");
    Ok(key)
}

/// Read an existing private key, first making sure other users cannot read it.
fn read_private(path: &Path) -> Result<PrivateKey, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    guard_mode(path, &file, &meta).map_err(read_err)?;
    let mut bytes = Zeroizing::new(Vec::new());
    (&file).read_to_end(&mut bytes).map_err(read_err)?;
    let text = std::str::from_utf8(&bytes).unwrap_or("");
    PrivateKey::from_base64(text).ok_or_else(|| KeyError::Malformed {
        path: path.to_path_buf(),
    })
}

/// A private key others may read (any of the "other" permission bits set) is tightened to
/// 0600 when the file belongs to this process's user: the key is ours, the fix is the one
/// `wg` would ask for, and stopping the mesh over it would only cost an outage. A file that
/// belongs to another user is theirs to manage, so it is refused: the operator must fix the
/// mode (and should consider a new key, since this one may have been read).
fn guard_mode(path: &Path, file: &std::fs::File, meta: &std::fs::Metadata) -> io::Result<()> {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 == 0 {
        return Ok(());
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "other users may read it (mode {mode:04o}), and it belongs to uid {}, not to this \
                 process (uid {me}), so clawnode will not change it: make it 0600 (chmod 600 {}) \
                 and consider generating a new key",
                meta.uid(),
                path.display()
            ),
        ));
    }
    tracing::warn!(
        component = "mesh",
        path = %path.display(),
        mode = format_args!("{mode:04o}"),
        "the WireGuard private key was readable by other users; its mode is now 0600 (consider generating a new key)"
    );
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
}

/// Read a preshared key file (as `wg genpsk` writes).
pub fn read_psk(path: &Path) -> Result<Psk, KeyError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?);
    let text = std::str::from_utf8(&bytes).unwrap_or("");
    let Ok(mut key) = Key::from_base64(text.trim()) else {
        return Err(KeyError::Malformed {
            path: path.to_path_buf(),
        });
    };
    let psk = Psk(key.0);
    key.0.zeroize();
    Ok(psk)
}

/// A public key as WireGuard tools print it.
pub fn to_base64(key: &PeerKey) -> String {
    Key(key.0).to_base64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn first_start_generates_a_private_key_with_mode_0600_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/wireguard.key");
        let first = load_or_generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_generate(&path).unwrap();
        assert_eq!(first.public(), again.public());
    }

    #[test]
    fn callers_racing_to_create_the_first_key_all_get_the_same_one() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state/wireguard.key");
            let barrier = std::sync::Barrier::new(8);
            let keys: Vec<String> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            to_base64(&load_or_generate(&path).unwrap().public())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let on_disk = to_base64(&load_or_generate(&path).unwrap().public());
            assert!(keys.iter().all(|k| *k == on_disk), "{keys:?} vs {on_disk}");
            // Nothing temporary left beside the key.
            let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
            assert_eq!(names.len(), 1);
        }
    }

    #[test]
    fn a_world_readable_key_of_ours_is_tightened_to_0600_and_still_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let key = load_or_generate(&path).unwrap();
        assert_eq!(
            to_base64(&key.public()),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_world_readable_key_of_another_user_is_refused_for_the_operator_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let other = nix::unistd::geteuid().as_raw() + 4242;
        if nix::unistd::chown(&path, Some(other.into()), None).is_err() {
            return; // Not root: cannot hand the file to another user here.
        }
        let err = load_or_generate(&path).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("mode 0644"), "{text}");
        assert!(text.contains("chmod 600"), "{text}");
        assert!(!text.contains("yAnz5"), "{text}");
        assert!(matches!(err.retry(), crate::core::Retry::NeedsOperator));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "another user's file is left alone");
    }

    #[test]
    fn a_key_written_by_wg_genkey_is_read_and_its_public_key_matches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        // Test vector: private key and the public key `wg pubkey` derives from it.
        std::fs::write(&path, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").unwrap();
        let key = load_or_generate(&path).unwrap();
        assert_eq!(
            to_base64(&key.public()),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn a_malformed_key_file_is_named_without_echoing_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "not-a-key-SECRETISH").unwrap();
        let err = load_or_generate(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()));
        assert!(!err.contains("SECRETISH"));
        assert_eq!(
            format!("{:?}", PrivateKey::generate()),
            "PrivateKey(<redacted>)"
        );
    }
}
