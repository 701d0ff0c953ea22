//! What the decision in `core::link_owner` needs from the system: the link that has the
//! configured name and its kind, where this process runs, and the record of the interface
//! clawnode created, kept in the state directory so a restart (after `keep_interface_on_stop`,
//! or a crash) still knows that interface as clawnode's. After a reboot the record names
//! another boot and claims nothing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::link::{Link, LinkError};
use super::userspace;
use crate::core::link_owner::{Created, Found, FoundKind, Here, WgKind};
use crate::state::{self, StateError};

pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join(state::WIREGUARD_INTERFACE)
}

#[derive(Serialize, Deserialize)]
struct Record {
    name: String,
    index: u32,
    kind: String,
    boot_id: String,
    netns: u64,
}

/// The recorded interface; a missing or unreadable record claims nothing.
pub fn load(path: &Path) -> Option<Created> {
    let bytes = std::fs::read(path).ok()?;
    let Ok(record) = serde_json::from_slice::<Record>(&bytes) else {
        tracing::warn!(component = "mesh", path = %path.display(), "ignoring a malformed record of the interface clawnode created");
        return None;
    };
    Some(Created {
        name: record.name,
        index: record.index,
        kind: WgKind::parse(&record.kind)?,
        boot_id: record.boot_id,
        netns: record.netns,
    })
}

pub fn save(path: &Path, created: &Created) -> Result<(), StateError> {
    let record = Record {
        name: created.name.clone(),
        index: created.index,
        kind: created.kind.as_str().to_string(),
        boot_id: created.boot_id.clone(),
        netns: created.netns,
    };
    let body = serde_json::to_vec(&record).unwrap_or_default();
    if let Some(dir) = path.parent() {
        state::ensure_private_dir(dir)?;
    }
    state::write_atomic(path, &body, 0o600)
}

pub fn remove(path: &Path) {
    if let Err(error) = std::fs::remove_file(path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(component = "mesh", path = %path.display(), %error, "cannot remove the record of the interface clawnode created");
    }
}

/// This boot and this network namespace.
pub fn here() -> Here {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let netns = std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino());
    Here { boot_id, netns }
}

/// The link named `name`, if any, and what it is. A tun device with a UAPI socket of its name
/// is userspace WireGuard; any other tun is not.
pub async fn find(link: &Link, name: &str) -> Result<Option<Found>, LinkError> {
    let Some(state) = link.get(name).await? else {
        return Ok(None);
    };
    let kind = match state.kind.as_deref() {
        Some("wireguard") => FoundKind::Wireguard(WgKind::Kernel),
        Some("tun") if userspace::socket_path(name).exists() => {
            FoundKind::Wireguard(WgKind::Userspace)
        }
        Some(kind) => FoundKind::Other(kind.to_string()),
        None => FoundKind::Other("device".to_string()),
    };
    Ok(Some(Found {
        index: state.index,
        kind,
    }))
}

/// The link named `name` as sysfs shows it, with no netlink and no privileges (for `doctor`):
/// `DEVTYPE=wireguard` is a kernel WireGuard link, a tun with a UAPI socket a userspace one.
pub fn find_in_sysfs(name: &str) -> Option<Found> {
    let dir = Path::new("/sys/class/net").join(name);
    let index = std::fs::read_to_string(dir.join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let devtype = std::fs::read_to_string(dir.join("uevent"))
        .ok()
        .and_then(|uevent| {
            uevent
                .lines()
                .find_map(|l| l.strip_prefix("DEVTYPE=").map(str::to_string))
        });
    let kind = if devtype.as_deref() == Some("wireguard") {
        FoundKind::Wireguard(WgKind::Kernel)
    } else if dir.join("tun_flags").exists() {
        if userspace::socket_path(name).exists() {
            FoundKind::Wireguard(WgKind::Userspace)
        } else {
            FoundKind::Other("tun".to_string())
        }
    } else {
        FoundKind::Other(devtype.unwrap_or_else(|| "network device".to_string()))
    };
    Some(Found { index, kind })
}

/// Does the record in `state_dir` name this very link?
pub fn recorded(state_dir: &Path, name: &str, found: &Found) -> bool {
    load(&record_path(state_dir)).is_some_and(|created| created.is(name, found, &here()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_survives_a_restart_and_a_malformed_one_claims_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(&dir.path().join("state"));
        let created = Created {
            name: "claw0".into(),
            index: 12,
            kind: WgKind::Userspace,
            boot_id: "8d2c".into(),
            netns: 4026531840,
        };
        save(&path, &created).unwrap();
        assert_eq!(load(&path), Some(created));
        std::fs::write(&path, b"{\"name\":").unwrap();
        assert_eq!(load(&path), None);
        remove(&path);
        assert_eq!(load(&path), None);
    }
}
