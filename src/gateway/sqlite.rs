//! The sqlite store: one file in WAL mode, so the daemon and the `clawnode gateway` commands
//! (separate processes) read and write it at once. Every write is one `BEGIN IMMEDIATE`
//! transaction, so two joins can never see the same free address.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::watch;

use super::store::{
    AdvertError, Change, Compacted, JoinError, JoinTxn, Joined, KEEP_CHANGES, KEEP_CHANGES_FOR_S,
    NewToken, NodeRow, State, Store, StoreError, TokenClaim,
};
use crate::core::coord::{Advert, NodeId, NodeRecord, Revocation, SignerCert};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    rev INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    address TEXT NOT NULL UNIQUE,
    wg_key TEXT NOT NULL,
    record TEXT NOT NULL,
    advert TEXT,
    advert_seq INTEGER NOT NULL DEFAULT 0,
    session_hash BLOB,
    revoked INTEGER NOT NULL DEFAULT 0,
    joined_at INTEGER NOT NULL,
    join_token TEXT
);
CREATE INDEX IF NOT EXISTS nodes_name ON nodes (name);
CREATE INDEX IF NOT EXISTS nodes_key ON nodes (wg_key);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    uses_left INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS signers (key_id TEXT PRIMARY KEY, cert TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revocations (node_id INTEGER PRIMARY KEY, body TEXT NOT NULL);
";

/// A handle on the store file; clones share one connection.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    store_id: u64,
    /// Bumped by writes made through this process, so `wait` wakes at once for them; writes by
    /// other processes are found by polling.
    head: Arc<watch::Sender<u64>>,
    /// Every address handed out, read incrementally (nodes are never deleted and a revoked
    /// node's address stays taken), so a join reads only the rows added since the last.
    taken: Arc<Mutex<Taken>>,
}

#[derive(Default)]
struct Taken {
    through_node: i64,
    addresses: BTreeSet<IpAddr>,
}

/// How often `wait` looks for writes made by another process (`clawnode gateway revoke`).
const POLL: Duration = Duration::from_millis(50);

fn db_err(error: rusqlite::Error) -> StoreError {
    let transient = matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    );
    StoreError::new(error.to_string(), transient)
}

fn json_err(error: serde_json::Error) -> StoreError {
    StoreError::new(format!("a stored row does not parse: {error}"), false)
}

impl SqliteStore {
    /// Create a new store (refused when the file exists) with a fresh `store_id`.
    pub fn create(path: &Path, store_id: u64) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError::new(
                format!("{} already exists", path.display()),
                false,
            ));
        }
        let conn = Self::connect(path)?;
        conn.execute(
            "INSERT INTO meta (k, v) VALUES ('store_id', ?1), ('compacted_through', 0)",
            params![store_id as i64],
        )
        .map_err(db_err)?;
        Self::wrap(conn)
    }

    /// Open an existing store.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::new(
                format!(
                    "{} does not exist: run `clawnode gateway init` first",
                    path.display()
                ),
                false,
            ));
        }
        Self::wrap(Self::connect(path)?)
    }

    fn connect(path: &Path) -> Result<Connection, StoreError> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        // Stores made before nodes remembered their token: add the column (another process
        // opening at the same time may have just added it).
        let has_column = conn
            .query_row(
                "SELECT 1 FROM pragma_table_info('nodes') WHERE name = 'join_token'",
                [],
                |_| Ok(()),
            )
            .optional()
            .map_err(db_err)?
            .is_some();
        if !has_column
            && let Err(error) = conn.execute_batch("ALTER TABLE nodes ADD COLUMN join_token TEXT")
            && !error.to_string().contains("duplicate column")
        {
            return Err(db_err(error));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(conn)
    }

    fn wrap(conn: Connection) -> Result<Self, StoreError> {
        let store_id: i64 = conn
            .query_row("SELECT v FROM meta WHERE k = 'store_id'", [], |r| r.get(0))
            .map_err(db_err)?;
        let head = head_of(&conn).map_err(db_err)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            store_id: store_id as u64,
            head: Arc::new(watch::Sender::new(head)),
            taken: Arc::default(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> T {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    fn bumped(&self, rev: u64) -> u64 {
        self.head.send_if_modified(|head| {
            let newer = rev > *head;
            if newer {
                *head = rev;
            }
            newer
        });
        rev
    }

    /// Run `f` on the blocking pool (sqlite blocks: fsync, busy waits on another process).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteStore) -> T + Send + 'static,
    ) -> T {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || f(&this)).await {
            Ok(value) => value,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }

    pub fn head_now(&self) -> Result<u64, StoreError> {
        let head = self.with(|conn| head_of(conn)).map_err(db_err)?;
        Ok(self.bumped(head))
    }

    /// Record a join token; only its hash is kept.
    pub fn create_token_blocking(
        &self,
        id: &str,
        hash: &[u8; 32],
        expires_at: u64,
        uses: u32,
        now: u64,
    ) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "INSERT INTO tokens (id, hash, expires_at, uses_left, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, hash.as_slice(), expires_at as i64, uses, now as i64],
            )
        })
        .map_err(db_err)?;
        Ok(())
    }

    pub fn nodes_blocking(&self) -> Result<Vec<NodeRow>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT node_id, name, address, wg_key, record, advert, revoked, joined_at FROM nodes ORDER BY node_id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, bool>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })?;
            rows.collect::<Result<Vec<_>, _>>()
        })
        .map_err(db_err)?
        .into_iter()
        .map(
            |(id, name, address, wg_key, record, advert, revoked, joined_at)| {
                let record: NodeRecord = serde_json::from_str(&record).map_err(json_err)?;
                let endpoints = match advert {
                    Some(text) => serde_json::from_str::<Advert>(&text)
                        .map_err(json_err)?
                        .endpoints,
                    None => Vec::new(),
                };
                Ok(NodeRow {
                    node_id: NodeId(id as u64),
                    name,
                    address: address
                        .parse()
                        .map_err(|_| StoreError::new("a stored address does not parse", false))?,
                    wg_key,
                    revoked,
                    serial: record.serial,
                    not_after: record.not_after,
                    joined_at: joined_at as u64,
                    endpoints,
                })
            },
        )
        .collect()
    }

    /// The node a name or `n<id>` names, revoked or not.
    pub fn find_node(&self, name_or_id: &str) -> Result<Option<NodeRow>, StoreError> {
        let id = name_or_id.parse::<NodeId>().ok();
        Ok(self
            .nodes_blocking()?
            .into_iter()
            .rev()
            .find(|row| Some(row.node_id) == id || (row.name == name_or_id && !row.revoked)))
    }

    pub fn snapshot_blocking(&self) -> Result<(u64, State), StoreError> {
        let (head, rows, signers, revocations) = self
            .with(|conn| {
                let tx = conn.transaction()?;
                let head = head_of(&tx)?;
                let rows = {
                    let mut stmt = tx.prepare(
                        "SELECT record, advert FROM nodes WHERE revoked = 0 ORDER BY node_id",
                    )?;
                    stmt.query_map([], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?
                };
                let signers = column(&tx, "SELECT cert FROM signers ORDER BY key_id")?;
                let revocations = column(&tx, "SELECT body FROM revocations ORDER BY node_id")?;
                tx.commit()?;
                Ok::<_, rusqlite::Error>((head, rows, signers, revocations))
            })
            .map_err(db_err)?;
        let mut state = State::default();
        for (record, advert) in rows {
            state
                .records
                .push(serde_json::from_str(&record).map_err(json_err)?);
            if let Some(advert) = advert {
                state
                    .adverts
                    .push(serde_json::from_str(&advert).map_err(json_err)?);
            }
        }
        for cert in signers {
            state
                .signers
                .push(serde_json::from_str(&cert).map_err(json_err)?);
        }
        for body in revocations {
            state
                .revocations
                .push(serde_json::from_str(&body).map_err(json_err)?);
        }
        Ok((self.bumped(head), state))
    }

    pub fn changes_since_blocking(
        &self,
        rev: u64,
    ) -> Result<Result<Vec<(u64, Change)>, Compacted>, StoreError> {
        let (through, rows) = self
            .with(|conn| {
                let tx = conn.transaction()?;
                let through: i64 = tx.query_row(
                    "SELECT v FROM meta WHERE k = 'compacted_through'",
                    [],
                    |r| r.get(0),
                )?;
                let rows = {
                    let mut stmt =
                        tx.prepare("SELECT rev, body FROM changes WHERE rev > ?1 ORDER BY rev")?;
                    stmt.query_map(params![rev as i64], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?
                };
                tx.commit()?;
                Ok::<_, rusqlite::Error>((through as u64, rows))
            })
            .map_err(db_err)?;
        if rev < through {
            return Ok(Err(Compacted));
        }
        let changes = rows
            .into_iter()
            .map(|(rev, body)| Ok((rev as u64, serde_json::from_str(&body).map_err(json_err)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        if let Some((last, _)) = changes.last() {
            self.bumped(*last);
        }
        Ok(Ok(changes))
    }

    pub fn join_blocking(&self, txn: JoinTxn) -> Result<Joined, JoinError> {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let joined = self.with(|conn| join_in(conn, &mut taken, txn))?;
        self.bumped(joined.rev);
        Ok(joined)
    }

    pub fn put_advert_blocking(&self, advert: Advert) -> Result<u64, AdvertError> {
        let rev = self.with(|conn| -> Result<u64, AdvertError> {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let last: Option<i64> = tx
                .query_row(
                    "SELECT advert_seq FROM nodes WHERE node_id = ?1 AND revoked = 0",
                    params![advert.node_id.0 as i64],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            let Some(last) = last else {
                return Err(AdvertError::UnknownNode);
            };
            if advert.seq <= last as u64 {
                return Err(AdvertError::Stale {
                    got: advert.seq,
                    last: last as u64,
                });
            }
            let body = serde_json::to_string(&advert).map_err(json_err)?;
            tx.execute(
                "UPDATE nodes SET advert = ?1, advert_seq = ?2 WHERE node_id = ?3",
                params![body, advert.seq as i64, advert.node_id.0 as i64],
            )
            .map_err(db_err)?;
            let rev = append(&tx, &Change::Advert(advert)).map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(rev)
        })?;
        Ok(self.bumped(rev))
    }

    pub fn revoke_blocking(&self, revocation: Revocation) -> Result<u64, StoreError> {
        let rev = self
            .with(|conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let body = serde_json::to_string(&revocation).unwrap_or_default();
                tx.execute(
                    "UPDATE nodes SET revoked = 1, session_hash = NULL WHERE node_id = ?1",
                    params![revocation.node_id.0 as i64],
                )?;
                tx.execute(
                    "INSERT OR REPLACE INTO revocations (node_id, body) VALUES (?1, ?2)",
                    params![revocation.node_id.0 as i64, body],
                )?;
                let rev = append(&tx, &Change::Revocation(revocation))?;
                tx.commit()?;
                Ok(rev)
            })
            .map_err(db_err)?;
        Ok(self.bumped(rev))
    }

    pub fn put_record_blocking(&self, record: NodeRecord) -> Result<u64, StoreError> {
        let rev = self
            .with(|conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let body = serde_json::to_string(&record).unwrap_or_default();
                let changed = tx.execute(
                    "UPDATE nodes SET record = ?1 WHERE node_id = ?2 AND revoked = 0",
                    params![body, record.node_id.0 as i64],
                )?;
                if changed == 0 {
                    return Ok(None);
                }
                let rev = append(&tx, &Change::Record(record))?;
                tx.commit()?;
                Ok(Some(rev))
            })
            .map_err(db_err)?;
        match rev {
            Some(rev) => Ok(self.bumped(rev)),
            None => Err(StoreError::new("no such node (revoked?)", false)),
        }
    }

    pub fn put_signer_blocking(&self, cert: SignerCert) -> Result<u64, StoreError> {
        let rev = self
            .with(|conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let body = serde_json::to_string(&cert).unwrap_or_default();
                tx.execute(
                    "INSERT OR REPLACE INTO signers (key_id, cert) VALUES (?1, ?2)",
                    params![cert.key_id.to_string(), body],
                )?;
                let rev = append(&tx, &Change::Signer(cert))?;
                tx.commit()?;
                Ok(rev)
            })
            .map_err(db_err)?;
        Ok(self.bumped(rev))
    }

    pub fn sessions_blocking(&self) -> Result<Vec<(NodeId, [u8; 32])>, StoreError> {
        let rows = self
            .with(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT node_id, session_hash FROM nodes WHERE revoked = 0 AND session_hash IS NOT NULL",
                )?;
                stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, hash)| Some((NodeId(id as u64), hash.try_into().ok()?)))
            .collect())
    }

    pub fn session_blocking(&self, node: NodeId) -> Result<Option<[u8; 32]>, StoreError> {
        let hash: Option<Vec<u8>> = self
            .with(|conn| {
                conn.query_row(
                    "SELECT session_hash FROM nodes WHERE node_id = ?1 AND revoked = 0 AND session_hash IS NOT NULL",
                    params![node.0 as i64],
                    |r| r.get(0),
                )
                .optional()
            })
            .map_err(db_err)?;
        Ok(hash.and_then(|h| h.try_into().ok()))
    }

    /// Drop changes older than both `keep` changes and `keep_for_s` seconds; returns how many.
    pub fn compact_blocking(
        &self,
        now: u64,
        keep: u64,
        keep_for_s: u64,
    ) -> Result<u64, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let head = head_of(&tx)?;
            let keep_from = head.saturating_sub(keep);
            let before = now.saturating_sub(keep_for_s);
            // Tokens long expired: a late try is told "unknown token" instead of "expired".
            tx.execute(
                "DELETE FROM tokens WHERE expires_at < ?1",
                params![before as i64],
            )?;
            let through: Option<i64> = tx.query_row(
                "SELECT max(rev) FROM changes WHERE rev <= ?1 AND at < ?2",
                params![keep_from as i64, before as i64],
                |r| r.get(0),
            )?;
            let Some(through) = through else {
                tx.commit()?;
                return Ok(0);
            };
            let removed = tx.execute("DELETE FROM changes WHERE rev <= ?1", params![through])?;
            tx.execute(
                "UPDATE meta SET v = max(v, ?1) WHERE k = 'compacted_through'",
                params![through],
            )?;
            tx.commit()?;
            Ok(removed as u64)
        })
        .map_err(db_err)
    }
}

fn head_of(conn: &Connection) -> rusqlite::Result<u64> {
    // sqlite_sequence keeps the highest rev even after compaction deleted every row.
    let seq: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'changes'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(seq.unwrap_or(0) as u64)
}

fn column(conn: &Connection, sql: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(sql)?;
    stmt.query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()
}

fn unix_now_approx(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT unixepoch()", [], |r| r.get(0))
}

fn append(conn: &Connection, change: &Change) -> rusqlite::Result<u64> {
    let body = serde_json::to_string(change).unwrap_or_default();
    let at = unix_now_approx(conn)?;
    conn.execute(
        "INSERT INTO changes (at, body) VALUES (?1, ?2)",
        params![at, body],
    )?;
    Ok(conn.last_insert_rowid() as u64)
}

/// Constant-time: a token's hash must not be guessable byte by byte from response times.
fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `address` is one `allocate` could hand out from `pool`: inside it, and not its
/// network or (IPv4) broadcast address unless the pool is a point-to-point /31 or /127.
fn assignable(pool: ipnet::IpNet, address: IpAddr) -> bool {
    if !pool.contains(&address) {
        return false;
    }
    match pool {
        ipnet::IpNet::V4(net) => {
            net.prefix_len() >= 31
                || (address != IpAddr::V4(net.network()) && address != IpAddr::V4(net.broadcast()))
        }
        ipnet::IpNet::V6(net) => net.prefix_len() >= 127 || address != IpAddr::V6(net.network()),
    }
}

/// A token's remaining uses, once its secret matches the stored hash and it has not expired.
fn token_uses_left(conn: &Connection, claim: &TokenClaim, now: u64) -> Result<i64, JoinError> {
    let row: Option<(Vec<u8>, i64, i64)> = conn
        .query_row(
            "SELECT hash, expires_at, uses_left FROM tokens WHERE id = ?1",
            params![claim.id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(db_err)?;
    let Some((hash, expires_at, uses_left)) = row else {
        return Err(JoinError::UnknownToken);
    };
    if !same_hash(&hash, &claim.hash) {
        return Err(JoinError::UnknownToken);
    }
    if now > expires_at as u64 {
        return Err(JoinError::TokenExpired);
    }
    Ok(uses_left)
}

/// The token checks a join can fail without the write lock: anyone can send a join, and an
/// unknown, forged, expired or spent token must not queue behind (or hold up) real writes.
/// Passing is re-checked inside the write transaction.
fn precheck_token(conn: &Connection, txn: &JoinTxn) -> Result<(), JoinError> {
    let Some(claim) = &txn.token else {
        return Ok(());
    };
    if token_uses_left(conn, claim, txn.now)? <= 0 {
        // Spent, unless this is a retry of the join that spent it.
        let retry = conn
            .query_row(
                "SELECT 1 FROM nodes WHERE name = ?1 AND wg_key = ?2 AND join_token = ?3 AND revoked = 0 AND joined_at >= ?4",
                params![txn.name, txn.wg_key, claim.id, retry_since(txn.now)],
                |_| Ok(()),
            )
            .optional()
            .map_err(db_err)?;
        if retry.is_none() {
            return Err(JoinError::TokenUsed);
        }
    }
    Ok(())
}

/// The gateway's own registration under a new name: the node keeps its id, address and key,
/// and its record is re-signed with the new name and the next serial.
fn rename_in(
    tx: rusqlite::Transaction<'_>,
    node: NodeId,
    txn: JoinTxn,
) -> Result<Joined, JoinError> {
    let (address, record): (String, String) = tx
        .query_row(
            "SELECT address, record FROM nodes WHERE node_id = ?1",
            params![node.0 as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db_err)?;
    let address: IpAddr = address
        .parse()
        .map_err(|_| StoreError::new("a stored address does not parse", false))?;
    if txn.requested_address.is_some_and(|a| a != address) {
        return Err(JoinError::KeyInUse(node));
    }
    let old: NodeRecord = serde_json::from_str(&record).map_err(json_err)?;
    let record = (txn.sign)(node, address, old.serial + 1).map_err(JoinError::Sign)?;
    let body = serde_json::to_string(&record).map_err(json_err)?;
    tx.execute(
        "UPDATE nodes SET name = ?1, record = ?2, session_hash = ?3 WHERE node_id = ?4",
        params![txn.name, body, txn.session_hash.as_slice(), node.0 as i64],
    )
    .map_err(db_err)?;
    let rev = append(&tx, &Change::Record(record.clone())).map_err(db_err)?;
    tx.commit().map_err(db_err)?;
    Ok(Joined { record, rev })
}

/// The retry window: one value for every store (the etcd store decides with
/// `core::coord::join`).
pub use crate::core::coord::join::JOIN_RETRY_WINDOW_S;

fn retry_since(now: u64) -> i64 {
    now.saturating_sub(JOIN_RETRY_WINDOW_S) as i64
}

fn join_in(conn: &mut Connection, taken: &mut Taken, txn: JoinTxn) -> Result<Joined, JoinError> {
    precheck_token(conn, &txn)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let uses_left = match &txn.token {
        Some(claim) => token_uses_left(&tx, claim, txn.now)?,
        None => 0,
    };
    // A live node of that name. Only the gateway's own start-up (no token) and a retry of the
    // token join that made it (its answer was lost) get it back; any other token join would
    // take over the node's session with nothing but its public name and key.
    let existing: Option<(i64, String, String, String, Option<String>, i64)> = tx
        .query_row(
            "SELECT node_id, wg_key, address, record, join_token, joined_at FROM nodes WHERE name = ?1 AND revoked = 0",
            params![txn.name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()
        .map_err(db_err)?;
    if let Some((id, key, address, record, join_token, joined_at)) = existing {
        let retry = match &txn.token {
            None => true,
            Some(claim) => {
                join_token.as_deref() == Some(claim.id.as_str())
                    && joined_at >= retry_since(txn.now)
            }
        };
        if !retry || key != txn.wg_key {
            return Err(if txn.token.is_some() {
                JoinError::NameInUse {
                    name: txn.name,
                    node: NodeId(id as u64),
                }
            } else {
                JoinError::NameTaken(txn.name)
            });
        }
        let address: IpAddr = address
            .parse()
            .map_err(|_| StoreError::new("a stored address does not parse", false))?;
        if txn.requested_address.is_some_and(|a| a != address) {
            return Err(JoinError::AddressTaken(address));
        }
        let old: NodeRecord = serde_json::from_str(&record).map_err(json_err)?;
        let record =
            (txn.sign)(NodeId(id as u64), address, old.serial + 1).map_err(JoinError::Sign)?;
        let body = serde_json::to_string(&record).map_err(json_err)?;
        tx.execute(
            "UPDATE nodes SET record = ?1, session_hash = ?2 WHERE node_id = ?3",
            params![body, txn.session_hash.as_slice(), id],
        )
        .map_err(db_err)?;
        let rev = append(&tx, &Change::Record(record.clone())).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        return Ok(Joined { record, rev });
    }
    if let Some(claim) = &txn.token {
        if uses_left <= 0 {
            return Err(JoinError::TokenUsed);
        }
        tx.execute(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1",
            params![claim.id],
        )
        .map_err(db_err)?;
    }
    // One key, one node, for ever: a revoked node must not come back with a new token, and
    // two nodes with one key would steal each other's WireGuard traffic.
    let owner: Option<(i64, bool)> = tx
        .query_row(
            "SELECT node_id, revoked FROM nodes WHERE wg_key = ?1 ORDER BY node_id DESC LIMIT 1",
            params![txn.wg_key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db_err)?;
    if let Some((id, revoked)) = owner {
        let node = NodeId(id as u64);
        if !revoked && txn.token.is_none() {
            // The gateway's own node after its `[node] name` changed: same key, same node.
            return rename_in(tx, node, txn);
        }
        return Err(if revoked {
            JoinError::KeyRevoked(node)
        } else {
            JoinError::KeyInUse(node)
        });
    }
    // Inside the write transaction: every row another process committed is visible.
    let new_rows = {
        let mut stmt = tx
            .prepare("SELECT node_id, address FROM nodes WHERE node_id > ?1")
            .map_err(db_err)?;
        stmt.query_map(params![taken.through_node], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(db_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)?
    };
    for (id, address) in new_rows {
        taken.through_node = taken.through_node.max(id);
        if let Ok(address) = address.parse() {
            taken.addresses.insert(address);
        }
    }
    let taken = &taken.addresses;
    let address = match txn.requested_address {
        Some(wanted) => {
            if !assignable(txn.pool, wanted) || txn.reserved.contains(&wanted) {
                return Err(JoinError::AddressUnusable {
                    address: wanted,
                    pool: txn.pool,
                });
            }
            if taken.contains(&wanted) {
                return Err(JoinError::AddressTaken(wanted));
            }
            wanted
        }
        None => crate::core::coord::allocate(txn.pool, taken, &txn.reserved)
            .ok_or(JoinError::PoolExhausted(txn.pool))?,
    };
    // AUTOINCREMENT: a revoked node's id is never handed out again.
    let next: i64 = tx
        .query_row(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'nodes'), 0) + 1",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    let record = (txn.sign)(NodeId(next as u64), address, 1).map_err(JoinError::Sign)?;
    let body = serde_json::to_string(&record).map_err(json_err)?;
    tx.execute(
        "INSERT INTO nodes (node_id, name, address, wg_key, record, session_hash, joined_at, join_token) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            next,
            txn.name,
            address.to_string(),
            txn.wg_key,
            body,
            txn.session_hash.as_slice(),
            txn.now as i64,
            txn.token.as_ref().map(|claim| claim.id.as_str())
        ],
    )
    .map_err(db_err)?;
    let rev = append(&tx, &Change::Record(record.clone())).map_err(db_err)?;
    tx.commit().map_err(db_err)?;
    Ok(Joined { record, rev })
}

impl Store for SqliteStore {
    fn store_id(&self) -> u64 {
        self.store_id
    }

    async fn snapshot(&self) -> Result<(u64, State), StoreError> {
        self.blocking(|s| s.snapshot_blocking()).await
    }

    async fn changes_since(
        &self,
        rev: u64,
    ) -> Result<Result<Vec<(u64, Change)>, Compacted>, StoreError> {
        self.blocking(move |s| s.changes_since_blocking(rev)).await
    }

    async fn wait(&self, rev: u64) -> Result<u64, StoreError> {
        let mut head = self.head.subscribe();
        loop {
            let now = *head.borrow_and_update();
            if now > rev {
                return Ok(now);
            }
            // Another process's write shows only in the file.
            let polled = self.blocking(|s| s.head_now()).await?;
            if polled > rev {
                return Ok(polled);
            }
            let _ = tokio::time::timeout(POLL, head.changed()).await;
        }
    }

    async fn join(&self, txn: JoinTxn) -> Result<Joined, JoinError> {
        self.blocking(move |s| s.join_blocking(txn)).await
    }

    async fn put_advert(&self, advert: Advert) -> Result<u64, AdvertError> {
        self.blocking(move |s| s.put_advert_blocking(advert)).await
    }

    async fn revoke(&self, revocation: Revocation) -> Result<u64, StoreError> {
        self.blocking(move |s| s.revoke_blocking(revocation)).await
    }

    async fn put_record(&self, record: NodeRecord) -> Result<u64, StoreError> {
        self.blocking(move |s| s.put_record_blocking(record)).await
    }

    async fn put_signer(&self, cert: SignerCert) -> Result<u64, StoreError> {
        self.blocking(move |s| s.put_signer_blocking(cert)).await
    }

    async fn sessions(&self) -> Result<Vec<(NodeId, [u8; 32])>, StoreError> {
        self.blocking(|s| s.sessions_blocking()).await
    }

    async fn revision_now(&self) -> Result<u64, StoreError> {
        self.blocking(|s| s.head_now()).await
    }

    async fn session(&self, node: NodeId) -> Result<Option<[u8; 32]>, StoreError> {
        self.blocking(move |s| s.session_blocking(node)).await
    }

    async fn create_token(&self, token: NewToken) -> Result<(), StoreError> {
        self.blocking(move |s| {
            s.create_token_blocking(
                &token.id,
                &token.hash,
                token.expires_at,
                token.uses,
                token.now,
            )
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        self.blocking(|s| s.nodes_blocking()).await
    }

    async fn compact(&self, now: u64) -> Result<u64, StoreError> {
        self.blocking(move |s| s.compact_blocking(now, KEEP_CHANGES, KEEP_CHANGES_FOR_S))
            .await
    }
}
