//! WireGuard keys at rest: the node's private key (generated on first start, 0600) and
//! per-peer preshared keys. Private material is zeroized and never printed.

use std::io;
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
pub fn load_or_generate(path: &Path) -> Result<PrivateKey, KeyError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let text = std::str::from_utf8(&bytes).unwrap_or("");
            PrivateKey::from_base64(text).ok_or_else(|| KeyError::Malformed {
                path: path.to_path_buf(),
            })
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            if let Some(dir) = path.parent() {
                state::ensure_private_dir(dir)?;
            }
            let mut text = key.to_base64();
            text.push('\n');
            state::write_atomic(path, text.as_bytes(), 0o600)?;
            tracing::info!(component = "mesh", path = %path.display(), public_key = %to_base64(&key.public()), "generated a new WireGuard private key");
            Ok(key)
        }
        Err(source) => Err(KeyError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
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
