//! Where a node is in a gateway's change stream.

use std::fmt;
use std::str::FromStr;

use super::ids::{parse_canonical_u64, serde_as_text};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A store and a revision in it: text `"<store_id: 16 hex digits>.<rev decimal>"`. A cursor
/// from another store (a re-inited cluster, another backend) is unknown and gets a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub store_id: u64,
    pub rev: u64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}.{}", self.store_id, self.rev)
    }
}

impl FromStr for Cursor {
    type Err = String;

    /// Strict: only what `Display` writes.
    fn from_str(s: &str) -> Result<Self, String> {
        let parsed = s.split_once('.').and_then(|(store, rev)| {
            let hex_ok = store.len() == 16
                && store
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return None;
            }
            Some(Cursor {
                store_id: u64::from_str_radix(store, 16).ok()?,
                rev: parse_canonical_u64(rev)?,
            })
        });
        parsed.ok_or_else(|| {
            format!(
                "expected a cursor like \"00000000000000ab.12\", got {:?}",
                s.chars().take(64).collect::<String>()
            )
        })
    }
}

serde_as_text!(Cursor);
