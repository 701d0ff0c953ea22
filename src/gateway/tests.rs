//! The gateway's store, view and handlers, the handlers over a real loopback TLS connection.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};

use super::server::Gateway;
use super::sqlite::SqliteStore;
use super::store::{Change, JoinError, JoinTxn, SignFn, TokenClaim};
use super::view::{self, View};
use super::{Signer, tls};
use crate::core::coord::{
    self, Cursor, ErrorBody, JoinResponse, KeyId, NodeId, RecordFields, Role, Secret32, TokenId,
    Update, UpdateKind,
};
use crate::core::peer_diff::PeerKey;

const STORE_ID: u64 = 0x42;
const NOW: u64 = 1_800_000_000;

fn root_pkcs8() -> Vec<u8> {
    coord::ed25519_pkcs8_from_seed(&[1; 32]).to_vec()
}

fn signer_pkcs8() -> Vec<u8> {
    coord::ed25519_pkcs8_from_seed(&[2; 32]).to_vec()
}

fn pool() -> IpNet {
    "10.100.0.0/16".parse().unwrap()
}

fn new_store(dir: &tempfile::TempDir) -> SqliteStore {
    let store = SqliteStore::create(&dir.path().join("store.sqlite"), STORE_ID).unwrap();
    let public = coord::public_key_of_pkcs8(&signer_pkcs8()).unwrap();
    let cert = coord::sign_signer(public, "gw", 1, NOW + 1_000_000, &root_pkcs8()).unwrap();
    store.put_signer_blocking(cert).unwrap();
    store
}

fn sign(name: &str, key: PeerKey) -> SignFn {
    let name = name.to_owned();
    Box::new(move |node_id, address, serial| {
        coord::sign_record(
            RecordFields {
                node_id,
                name: name.clone(),
                wg_key: key,
                addresses: vec![address],
                roles: vec![Role::Node],
                serial,
                not_after: NOW + 1000,
                gateway_url: None,
            },
            &signer_pkcs8(),
        )
        .map_err(|e| e.to_string())
    })
}

fn key(n: u32) -> PeerKey {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    bytes[31] = 1;
    PeerKey(bytes)
}

fn txn(token: Option<(&str, &Secret32)>, name: &str, n: u32, now: u64) -> JoinTxn {
    JoinTxn {
        token: token.map(|(id, secret)| TokenClaim {
            id: id.to_owned(),
            hash: coord::token_hash(secret),
        }),
        now,
        name: name.to_owned(),
        wg_key: coord::b64::wg_key_to_string(&key(n)),
        requested_address: None,
        session_hash: [n as u8; 32],
        pool: pool(),
        reserved: vec!["10.100.0.1".parse().unwrap()],
        sign: sign(name, key(n)),
    }
}

fn token(store: &SqliteStore, id: &str, uses: u32, expires_at: u64) -> Secret32 {
    let secret = Secret32(super::random_32());
    store
        .create_token_blocking(id, &coord::token_hash(&secret), expires_at, uses, NOW)
        .unwrap();
    secret
}

// ---- store ----

#[test]
fn racing_joins_from_many_processes_never_share_an_address() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let secret = token(&store, "00000000000000aa", 2_000, NOW + 3600);
    let path = dir.path().join("store.sqlite");
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            // Separate connections, as separate processes would have.
            let handle = SqliteStore::open(&path).unwrap();
            let secret = secret.clone();
            std::thread::spawn(move || {
                (0..250u32)
                    .map(|i| {
                        let n = t * 1000 + i;
                        let joined = handle
                            .join_blocking(txn(
                                Some(("00000000000000aa", &secret)),
                                &format!("node-{n}"),
                                n,
                                NOW,
                            ))
                            .unwrap();
                        joined.record.addresses[0]
                    })
                    .collect::<Vec<IpAddr>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for thread in threads {
        all.extend(thread.join().unwrap());
    }
    let distinct: BTreeSet<_> = all.iter().collect();
    assert_eq!(all.len(), 2_000);
    assert_eq!(distinct.len(), 2_000, "an address was handed out twice");
    assert!(
        !distinct.contains(&"10.100.0.1".parse::<IpAddr>().unwrap()),
        "the reserved address"
    );
    assert!(matches!(
        store.join_blocking(txn(Some(("00000000000000aa", &secret)), "late", 9_999, NOW)),
        Err(JoinError::TokenUsed)
    ));
}

#[test]
fn a_token_is_single_use_expires_and_must_match_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let once = token(&store, "0000000000000001", 1, NOW + 3600);
    store
        .join_blocking(txn(Some(("0000000000000001", &once)), "a", 1, NOW))
        .unwrap();
    let again = store.join_blocking(txn(Some(("0000000000000001", &once)), "b", 2, NOW));
    assert_eq!(again.unwrap_err().to_string(), "token already used");

    let short = token(&store, "0000000000000002", 5, NOW + 60);
    let late = store.join_blocking(txn(Some(("0000000000000002", &short)), "c", 3, NOW + 61));
    assert_eq!(late.unwrap_err().to_string(), "token expired");

    let wrong = Secret32([9; 32]);
    let forged = store.join_blocking(txn(Some(("0000000000000002", &wrong)), "d", 4, NOW));
    assert_eq!(forged.unwrap_err().to_string(), "unknown token");
}

#[test]
fn a_join_with_a_bad_token_is_refused_at_once_while_another_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let used = token(&store, "00000000000000f1", 1, NOW + 3600);
    store
        .join_blocking(txn(Some(("00000000000000f1", &used)), "a", 1, NOW))
        .unwrap();
    let expired = token(&store, "00000000000000f2", 1, NOW - 1);
    // Another process (`clawnode gateway revoke`, say) holds the write lock.
    let other = rusqlite::Connection::open(dir.path().join("store.sqlite")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let forged = Secret32([9; 32]);
    let started = std::time::Instant::now();
    for (claim, n, want) in [
        (("00000000000000f9", &forged), 2, "unknown token"),
        (("00000000000000f1", &forged), 3, "unknown token"),
        (("00000000000000f2", &expired), 4, "token expired"),
        (("00000000000000f1", &used), 5, "token already used"),
    ] {
        let refused = store
            .join_blocking(txn(Some(claim), &format!("x{n}"), n, NOW))
            .unwrap_err();
        assert_eq!(refused.to_string(), want);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused without waiting for the write lock ({:?})",
        started.elapsed()
    );
    other.execute_batch("ROLLBACK").unwrap();
}

#[test]
fn a_store_made_before_nodes_kept_their_token_opens_and_takes_joins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    {
        let old = rusqlite::Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
             INSERT INTO meta (k, v) VALUES ('store_id', 66), ('compacted_through', 0);
             CREATE TABLE nodes (
                 node_id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
                 address TEXT NOT NULL UNIQUE, wg_key TEXT NOT NULL, record TEXT NOT NULL,
                 advert TEXT, advert_seq INTEGER NOT NULL DEFAULT 0, session_hash BLOB,
                 revoked INTEGER NOT NULL DEFAULT 0, joined_at INTEGER NOT NULL);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let secret = token(&store, "00000000000000b1", 1, NOW + 3600);
    store
        .join_blocking(txn(Some(("00000000000000b1", &secret)), "a", 1, NOW))
        .unwrap();
    drop(store);
    SqliteStore::open(&path).expect("opens again once migrated");
}

#[test]
fn the_store_keeps_only_the_token_hash_never_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let secret = token(&store, "0000000000000003", 1, NOW + 3600);
    drop(store);
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let found = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(found(&coord::token_hash(&secret)), "the hash is stored");
    assert!(!found(&secret.0), "the secret is not");
    assert!(!found(secret.to_b64url().as_bytes()), "nor its text");
}

#[test]
fn changes_come_in_order_and_a_compacted_cursor_is_told_to_take_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    for n in 0..5 {
        store
            .join_blocking(txn(None, &format!("n{n}x"), n, NOW))
            .unwrap();
    }
    let changes = store.changes_since_blocking(0).unwrap().unwrap();
    let revs: Vec<u64> = changes.iter().map(|(rev, _)| *rev).collect();
    assert_eq!(revs, vec![1, 2, 3, 4, 5, 6], "signer, then five records");
    assert!(matches!(changes[0].1, Change::Signer(_)));
    let since_4 = store.changes_since_blocking(4).unwrap().unwrap();
    assert_eq!(since_4.len(), 2);

    // Keep the last 2 changes; everything older (and old enough) goes.
    let old = token(&store, "00000000000000c1", 1, NOW + 60);
    let removed = store
        .compact_blocking(NOW + 10 * 86_400, 2, 86_400)
        .unwrap();
    assert_eq!(removed, 4);
    let late = store.join_blocking(txn(
        Some(("00000000000000c1", &old)),
        "late",
        99,
        NOW + 10 * 86_400,
    ));
    assert_eq!(
        late.unwrap_err().to_string(),
        "unknown token",
        "long-expired tokens are purged"
    );
    assert!(
        store.changes_since_blocking(1).unwrap().is_err(),
        "compacted"
    );
    assert_eq!(store.changes_since_blocking(4).unwrap().unwrap().len(), 2);
    let (head, state) = store.snapshot_blocking().unwrap();
    assert_eq!(head, 6);
    assert_eq!(state.records.len(), 5);
    assert_eq!(state.signers.len(), 1);
}

#[test]
fn a_rejoin_with_the_same_name_and_key_keeps_the_node_and_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let first = store.join_blocking(txn(None, "gpu-1", 1, NOW)).unwrap();
    let again = store.join_blocking(txn(None, "gpu-1", 1, NOW)).unwrap();
    assert_eq!(first.record.node_id, again.record.node_id);
    assert_eq!(first.record.addresses, again.record.addresses);
    assert_eq!(again.record.serial, first.record.serial + 1);
    let mut other = txn(None, "gpu-1", 2, NOW);
    other.sign = sign("gpu-1", key(2));
    assert!(matches!(
        store.join_blocking(other),
        Err(JoinError::NameTaken(_))
    ));
}

#[test]
fn a_token_join_with_the_name_and_key_of_a_live_node_is_refused_and_its_session_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let first = token(&store, "00000000000000d1", 1, NOW + 3600);
    let joined = store
        .join_blocking(txn(Some(("00000000000000d1", &first)), "gpu-1", 1, NOW))
        .unwrap();
    // Anyone with another token and the node's public name and key.
    let other = token(&store, "00000000000000d2", 1, NOW + 3600);
    let mut takeover = txn(Some(("00000000000000d2", &other)), "gpu-1", 1, NOW);
    takeover.session_hash = [0xee; 32];
    let refused = store.join_blocking(takeover).unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!(
            "name gpu-1 is in use by {}: revoke it first or pick another name",
            joined.record.node_id
        )
    );
    assert!(!refused.retry());
    assert_eq!(
        store.sessions_blocking().unwrap(),
        vec![(joined.record.node_id, [1; 32])],
        "the node keeps its session"
    );
}

#[test]
fn a_join_retried_after_a_lost_answer_gets_the_same_node_and_a_fresh_session() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let once = token(&store, "00000000000000d3", 1, NOW + 3600);
    let first = store
        .join_blocking(txn(Some(("00000000000000d3", &once)), "gpu-1", 1, NOW))
        .unwrap();
    let mut retry = txn(Some(("00000000000000d3", &once)), "gpu-1", 1, NOW + 5);
    retry.session_hash = [0x77; 32];
    let again = store.join_blocking(retry).unwrap();
    assert_eq!(again.record.node_id, first.record.node_id);
    assert_eq!(again.record.addresses, first.record.addresses);
    assert_eq!(
        store.sessions_blocking().unwrap(),
        vec![(first.record.node_id, [0x77; 32])]
    );
    // The same token with another key, or a forged secret, is no retry.
    let mut other_key = txn(Some(("00000000000000d3", &once)), "gpu-1", 2, NOW + 5);
    other_key.sign = sign("gpu-1", key(2));
    assert!(matches!(
        store.join_blocking(other_key),
        Err(JoinError::TokenUsed)
    ));
    // With uses left, the name is what refuses it.
    let many = token(&store, "00000000000000d4", 5, NOW + 3600);
    let mut other_key = txn(Some(("00000000000000d4", &many)), "gpu-1", 2, NOW + 5);
    other_key.sign = sign("gpu-1", key(2));
    assert!(matches!(
        store.join_blocking(other_key),
        Err(JoinError::NameInUse { .. })
    ));
    let forged = Secret32([9; 32]);
    assert!(matches!(
        store.join_blocking(txn(Some(("00000000000000d3", &forged)), "gpu-1", 1, NOW)),
        Err(JoinError::UnknownToken)
    ));
}

#[test]
fn a_gateway_renamed_in_its_config_keeps_its_node_and_address() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    // As the gateway registers itself: its configured address, nothing reserved.
    let mut own = txn(None, "gw-old", 9, NOW);
    own.requested_address = Some("10.100.0.1".parse().unwrap());
    own.reserved = Vec::new();
    own.sign = sign("gw-old", key(9));
    let first = store.join_blocking(own).unwrap();
    let mut renamed = txn(None, "gw-new", 9, NOW + 60);
    renamed.requested_address = Some("10.100.0.1".parse().unwrap());
    renamed.reserved = Vec::new();
    renamed.sign = sign("gw-new", key(9));
    let again = store.join_blocking(renamed).unwrap();
    assert_eq!(again.record.node_id, first.record.node_id);
    assert_eq!(again.record.name, "gw-new");
    assert_eq!(again.record.addresses, first.record.addresses);
    assert_eq!(again.record.serial, first.record.serial + 1);
    // A token join with that key is still refused: the key is the gateway's.
    let t = token(&store, "00000000000000d6", 1, NOW + 3600);
    let mut stolen = txn(Some(("00000000000000d6", &t)), "evil", 9, NOW + 60);
    stolen.sign = sign("evil", key(9));
    assert!(matches!(
        store.join_blocking(stolen),
        Err(JoinError::KeyInUse(_))
    ));
}

#[test]
fn a_shared_token_cannot_take_over_its_node_once_the_retry_window_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let fleet = token(&store, "00000000000000d5", 50, NOW + 86_400);
    let first = store
        .join_blocking(txn(Some(("00000000000000d5", &fleet)), "gpu-1", 1, NOW))
        .unwrap();
    // Another holder of the fleet token, an hour later, with gpu-1's public name and key.
    let late = NOW + super::sqlite::JOIN_RETRY_WINDOW_S + 1;
    let mut takeover = txn(Some(("00000000000000d5", &fleet)), "gpu-1", 1, late);
    takeover.session_hash = [0x66; 32];
    assert!(matches!(
        store.join_blocking(takeover),
        Err(JoinError::NameInUse { .. })
    ));
    assert_ne!(
        store.sessions_blocking().unwrap(),
        vec![(first.record.node_id, [0x66; 32])]
    );
}

#[test]
fn a_revoked_nodes_key_cannot_join_again_and_is_told_to_make_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let first = token(&store, "00000000000000e1", 1, NOW + 3600);
    let joined = store
        .join_blocking(txn(Some(("00000000000000e1", &first)), "gpu-1", 1, NOW))
        .unwrap();
    let node = joined.record.node_id;
    // Another name with the live node's key.
    let second = token(&store, "00000000000000e2", 5, NOW + 3600);
    let mut twin = txn(Some(("00000000000000e2", &second)), "gpu-2", 1, NOW);
    twin.sign = sign("gpu-2", key(1));
    let refused = store.join_blocking(twin).unwrap_err();
    assert!(
        matches!(refused, JoinError::KeyInUse(n) if n == node),
        "{refused}"
    );

    let revocation = coord::sign_revocation(node, u64::MAX, &signer_pkcs8()).unwrap();
    store.revoke_blocking(revocation).unwrap();
    let back = store
        .join_blocking(txn(Some(("00000000000000e2", &second)), "gpu-1", 1, NOW))
        .unwrap_err();
    let text = back.to_string();
    assert!(text.contains(&format!("revoked node {node}")), "{text}");
    assert!(text.contains("remove <state_dir>/wireguard.key"), "{text}");
    assert!(!back.retry());
    // A new key joins under the same name.
    let mut fresh = txn(Some(("00000000000000e2", &second)), "gpu-1", 2, NOW);
    fresh.sign = sign("gpu-1", key(2));
    assert_ne!(store.join_blocking(fresh).unwrap().record.node_id, node);
}

#[test]
fn a_requested_address_outside_the_free_part_of_the_pool_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let secret = token(&store, "00000000000000e3", 10, NOW + 3600);
    let claim = Some(("00000000000000e3", &secret));
    let first = store.join_blocking(txn(claim, "a", 1, NOW)).unwrap();
    let taken = first.record.addresses[0];
    for (n, wanted) in ["10.100.0.0", "10.100.255.255", "10.100.0.1", "10.200.0.5"]
        .into_iter()
        .enumerate()
    {
        let mut join = txn(claim, &format!("b{n}"), 10 + n as u32, NOW);
        join.requested_address = Some(wanted.parse().unwrap());
        let refused = store.join_blocking(join).unwrap_err();
        assert!(
            matches!(refused, JoinError::AddressUnusable { .. }),
            "{wanted}: {refused}"
        );
    }
    let mut join = txn(claim, "c", 20, NOW);
    join.requested_address = Some(taken);
    assert!(matches!(
        store.join_blocking(join),
        Err(JoinError::AddressTaken(_))
    ));
    let mut join = txn(claim, "d", 21, NOW);
    join.requested_address = Some("10.100.0.9".parse().unwrap());
    assert_eq!(
        store.join_blocking(join).unwrap().record.addresses,
        vec!["10.100.0.9".parse::<IpAddr>().unwrap()]
    );
}

// ---- view ----

fn record(node: u64, n: u32) -> coord::NodeRecord {
    coord::sign_record(
        RecordFields {
            node_id: NodeId(node),
            name: format!("node-{node}"),
            wg_key: key(n),
            addresses: vec![IpAddr::from([10, 100, 0, node as u8])],
            roles: vec![Role::Node],
            serial: 1,
            not_after: NOW + 1000,
            gateway_url: None,
        },
        &signer_pkcs8(),
    )
    .unwrap()
}

fn decode(bytes: &[u8]) -> Update {
    serde_json::from_slice(bytes).unwrap()
}

fn view_at(rev: u64) -> View {
    let view = View::new(STORE_ID, vec!["https://127.0.0.1:1".into()]);
    let changes: Vec<_> = (1..=rev)
        .map(|r| (r, Change::Record(record(r, r as u32))))
        .collect();
    view.reset(0, Default::default(), Vec::new());
    view.apply(changes);
    view
}

#[test]
fn a_current_cursor_gets_only_what_changed_since() {
    let view = view_at(3);
    let cursor = Cursor {
        store_id: STORE_ID,
        rev: 3,
    };
    assert!(
        view.answer(Some(cursor)).is_none(),
        "current: nothing to send yet"
    );
    view.apply(vec![(4, Change::Record(record(4, 4)))]);
    let answer = view.answer(Some(cursor)).unwrap();
    let update = decode(&answer.json);
    assert_eq!(update.kind, UpdateKind::Delta);
    assert_eq!(update.cursor.rev, 4);
    assert_eq!(update.records.len(), 1);
    assert_eq!(update.records[0].node_id, NodeId(4));
}

#[test]
fn an_unknown_store_or_a_cursor_older_than_the_ring_gets_a_snapshot() {
    let view = view_at(3);
    let other = Cursor {
        store_id: 7,
        rev: 3,
    };
    let update = decode(&view.answer(Some(other)).unwrap().json);
    assert_eq!(update.kind, UpdateKind::Snapshot);
    assert_eq!(update.records.len(), 3);
    assert_eq!(
        decode(&view.answer(None).unwrap().json).kind,
        UpdateKind::Snapshot
    );
    // A view loaded at rev 3 with no ring: rev 1 is before what it can build deltas from.
    let fresh = View::new(STORE_ID, Vec::new());
    fresh.reset(3, Default::default(), Vec::new());
    let old = Cursor {
        store_id: STORE_ID,
        rev: 1,
    };
    assert_eq!(
        decode(&fresh.answer(Some(old)).unwrap().json).kind,
        UpdateKind::Snapshot
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_is_encoded_once_for_every_session_waiting_on_it() {
    let view = Arc::new(view_at(3));
    let cursor = Cursor {
        store_id: STORE_ID,
        rev: 3,
    };
    let before = view
        .counters
        .encodings
        .load(std::sync::atomic::Ordering::Relaxed);
    let waiters: Vec<_> = (0..200)
        .map(|_| {
            let view = Arc::clone(&view);
            tokio::spawn(async move {
                super::server::poll(&view, Some(cursor), Duration::from_secs(10)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    view.apply(vec![(4, Change::Record(record(4, 4)))]);
    let mut answers = Vec::new();
    for waiter in waiters {
        answers.push(waiter.await.unwrap());
    }
    assert!(
        answers.iter().all(|a| Arc::ptr_eq(a, &answers[0])),
        "one shared body"
    );
    assert_eq!(decode(&answers[0].json).records.len(), 1);
    let after = view
        .counters
        .encodings
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after - before, 1, "encoded once");
}

#[test]
fn polling_two_thousand_old_cursors_keeps_the_delta_cache_under_its_cap() {
    let view = View::new(STORE_ID, vec!["https://127.0.0.1:1".into()]);
    view.reset(0, Default::default(), Vec::new());
    // 2,100 adverts over 50 nodes, ~400 bytes each: a delta from an old cursor is ~20 KiB.
    let changes: Vec<_> = (1..=2_100u64)
        .map(|rev| {
            let node = rev % 50 + 1;
            let advert = coord::Advert {
                node_id: NodeId(node),
                seq: rev,
                endpoints: (0..8)
                    .map(|i| SocketAddr::from(([198, 51, 100, i], 51_820 + node as u16)))
                    .collect(),
                services: (0..6)
                    .map(|i| coord::AdvertService {
                        name: format!("service-{i}"),
                        port: 8000 + i,
                    })
                    .collect(),
                gpus: None,
            };
            (rev, Change::Advert(advert))
        })
        .collect();
    view.apply(changes);
    let mut biggest = 0;
    for rev in 0..2_000 {
        let answer = view
            .answer(Some(Cursor {
                store_id: STORE_ID,
                rev,
            }))
            .unwrap();
        assert_eq!(answer.kind, UpdateKind::Delta);
        biggest = biggest.max(view.delta_cache_bytes());
    }
    assert!(
        biggest <= view::DELTA_CACHE_MAX,
        "the cache reached {biggest} bytes"
    );
    let last = view
        .answer(Some(Cursor {
            store_id: STORE_ID,
            rev: 1_999,
        }))
        .unwrap();
    assert_eq!(decode(&last.json).adverts.len(), 50);
    let again = view
        .answer(Some(Cursor {
            store_id: STORE_ID,
            rev: 1_999,
        }))
        .unwrap();
    assert!(
        Arc::ptr_eq(&last, &again),
        "a recent cursor is still shared"
    );
}

// ---- handlers over TLS ----

struct Harness {
    addr: SocketAddr,
    ca_der: Vec<u8>,
    store: Arc<SqliteStore>,
    view: Arc<View>,
    _dir: tempfile::TempDir,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for task in &self._tasks {
            task.abort();
        }
    }
}

async fn harness(max_sessions: usize) -> Harness {
    harness_fed(max_sessions, true).await
}

/// `fed: false`: the view never follows the store (a gateway whose feed stalled).
async fn harness_fed(max_sessions: usize, fed: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(&dir));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("https://{addr}");
    let view = Arc::new(View::new(STORE_ID, vec![url]));
    view::load(&*store, &view).await.unwrap();
    let pkcs8 = zeroize::Zeroizing::new(signer_pkcs8());
    let public = coord::public_key_of_pkcs8(&pkcs8).unwrap();
    let gateway = Arc::new(Gateway {
        store: Arc::clone(&store),
        view: Arc::clone(&view),
        signer: Arc::new(Signer {
            pkcs8,
            key_id: KeyId::of(&public),
        }),
        pool: pool(),
        mesh_cidr: pool(),
        reserved: vec!["10.100.0.1".parse().unwrap()],
        gateways: vec![format!("https://{addr}")],
        record_lifetime: 30 * 86_400,
        max_sessions,
    });
    let ca_der = tls::pem_to_der(&tls::ca_pem(&root_pkcs8()).unwrap()).unwrap();
    let (leaf, leaf_key) =
        tls::issue_leaf(&root_pkcs8(), &["127.0.0.1".to_owned()], super::unix_now()).unwrap();
    let config = tls::server_config(leaf, leaf_key, ca_der.clone()).unwrap();
    let mut tasks = vec![tokio::spawn(super::server::serve(
        gateway, listener, config,
    ))];
    if fed {
        tasks.push(tokio::spawn(view::feed(
            Arc::clone(&store),
            Arc::clone(&view),
        )));
    }
    Harness {
        addr,
        ca_der,
        store,
        view,
        _dir: dir,
        _tasks: tasks,
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Harness {
    /// A gateway over the harness's store and view, to call its methods
    /// (re-signing, signing) directly rather than over HTTP.
    fn gateway(&self) -> Gateway<SqliteStore> {
        Gateway {
            store: Arc::clone(&self.store),
            view: Arc::clone(&self.view),
            signer: Arc::new(Signer::load_bytes(signer_pkcs8())),
            pool: pool(),
            mesh_cidr: pool(),
            reserved: Vec::new(),
            gateways: Vec::new(),
            record_lifetime: 30 * 86_400,
            max_sessions: 8,
        }
    }

    /// A TLS stream that trusts only the cluster CA.
    async fn tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        connector.connect(name, tcp).await.unwrap()
    }

    /// An HTTP/1.1 connection over [`Harness::tls`].
    async fn connect(&self) -> Sender {
        let tls = self.tls().await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, hyper::HeaderMap, Bytes) {
        let mut sender = self.connect().await;
        send(&mut sender, method, path, bearer, body).await
    }

    async fn join(&self, token: &str, secret: &Secret32, name: &str, n: u32) -> (u16, Bytes) {
        let body = serde_json::json!({
            "token_id": token,
            "token_secret": secret.to_b64url().as_str(),
            "name": name,
            "wg_key": coord::b64::wg_key_to_string(&key(n)),
            "endpoints": ["0.0.0.0:51820"],
            "requested_address": null,
        });
        let (status, _, body) = self
            .call("POST", "/v1/join", None, serde_json::to_vec(&body).unwrap())
            .await;
        (status, body)
    }
}

async fn send(
    sender: &mut Sender,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Vec<u8>,
) -> (u16, hyper::HeaderMap, Bytes) {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1");
    if let Some(bearer) = bearer {
        request = request.header("authorization", format!("Bearer {bearer}"));
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn error_of(body: &[u8]) -> ErrorBody {
    serde_json::from_slice(body).unwrap()
}

const TOKEN_ID: &str = "00000000000000a1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_over_tls_and_a_reused_or_expired_token_is_refused_clearly() {
    let h = harness(64).await;
    let secret = token(&h.store, TOKEN_ID, 1, super::unix_now() + 3600);
    let (status, body) = h.join(TOKEN_ID, &secret, "gpu-1", 1).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let joined: JoinResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        joined.record.addresses,
        vec!["10.100.0.2".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(joined.session.node_id, joined.node_id);

    let (status, body) = h.join(TOKEN_ID, &secret, "gpu-2", 2).await;
    assert_eq!(status, 403);
    let error = error_of(&body);
    assert_eq!(error.error, "token already used");
    assert!(!error.retry);

    let expired_id = "00000000000000a2";
    let expired = token(&h.store, expired_id, 1, super::unix_now() - 1);
    let (status, body) = h.join(expired_id, &expired, "gpu-3", 3).await;
    assert_eq!(status, 403);
    assert_eq!(error_of(&body).error, "token expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_answered_408_and_its_connection_slot_freed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness(1).await;
    let mut stalled = h.tls().await;
    stalled
        .write_all(
            b"POST /v1/join HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{",
        )
        .await
        .unwrap();
    stalled.flush().await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        super::server::BODY_TIMEOUT + Duration::from_secs(5),
        stalled.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "the stalled connection was still open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"retry\":true"), "{answer}");
    // The one slot is free again: a later request is served, not told 503.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while h.view.role_doc().connections > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, _) = h.call("GET", "/v1/status", None, Vec::new()).await;
    assert_eq!(status, 401, "served (no session), not refused busy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_returns_as_soon_as_another_node_joins() {
    let h = harness(64).await;
    let secret = token(&h.store, TOKEN_ID, 2, super::unix_now() + 3600);
    let (_, body) = h.join(TOKEN_ID, &secret, "gpu-1", 1).await;
    let joined: JoinResponse = serde_json::from_slice(&body).unwrap();
    let bearer = joined.session.bearer().to_string();
    // The join wrote a record and an advert: let the view take both in.
    while h.view.head() < h.store.head_now().unwrap() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // First poll, no cursor: a snapshot with this node in it.
    let (status, _, body) = h.call("GET", "/v1/peers", Some(&bearer), Vec::new()).await;
    assert_eq!(status, 200);
    let snapshot: Update = serde_json::from_slice(&body).unwrap();
    assert_eq!(snapshot.kind, UpdateKind::Snapshot);
    let path = format!("/v1/peers?cursor={}&wait=20", snapshot.cursor);
    let started = std::time::Instant::now();
    let poll = {
        let mut sender = h.connect().await;
        let bearer = bearer.clone();
        tokio::spawn(
            async move { send(&mut sender, "GET", &path, Some(&bearer), Vec::new()).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "a current cursor waits");
    let (status, _) = h.join(TOKEN_ID, &secret, "gpu-2", 2).await;
    assert_eq!(status, 200);
    let (status, _, body) = poll.await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, 200);
    let delta: Update = serde_json::from_slice(&body).unwrap();
    assert_eq!(delta.kind, UpdateKind::Delta);
    assert!(delta.records.iter().any(|r| r.name == "gpu-2"), "{delta:?}");
    assert!(
        took < Duration::from_secs(5),
        "returned on the change, not at the wait's end"
    );
    // The join's unspecified endpoint became the address the gateway saw.
    assert!(
        delta
            .adverts
            .iter()
            .any(|a| a.endpoints == vec!["127.0.0.1:51820".parse::<SocketAddr>().unwrap()]),
        "{delta:?}"
    );
    let (status, _, _) = h
        .call(
            "GET",
            "/v1/peers",
            Some("n1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            Vec::new(),
        )
        .await;
    assert_eq!(status, 401, "a wrong session secret");
    assert!(h.view.head() >= delta.cursor.rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_capacity_the_gateway_answers_503_with_a_jittered_retry_after() {
    let h = harness(1).await;
    let _held = h.connect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, headers, body) = h.call("GET", "/v1/status", None, Vec::new()).await;
    assert_eq!(status, 503);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry), "{retry}");
    assert!(error_of(&body).retry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advert_with_a_stale_seq_is_refused_and_services_are_answered_from_the_view() {
    let h = harness(64).await;
    let secret = token(&h.store, TOKEN_ID, 1, super::unix_now() + 3600);
    let (_, body) = h.join(TOKEN_ID, &secret, "gpu-1", 1).await;
    let joined: JoinResponse = serde_json::from_slice(&body).unwrap();
    let bearer = joined.session.bearer().to_string();
    let advert = |seq: u64| {
        serde_json::to_vec(&serde_json::json!({
            "node_id": joined.node_id.to_string(),
            "seq": seq,
            "endpoints": ["198.51.100.7:51820"],
            "services": [{"name": "molt-provider", "port": 8443}],
            "gpus": null,
        }))
        .unwrap()
    };
    let (status, _, body) = h.call("PUT", "/v1/self", Some(&bearer), advert(5)).await;
    assert_eq!(status, 204, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = h.call("PUT", "/v1/self", Some(&bearer), advert(5)).await;
    assert_eq!(status, 409);
    // The refusal says which seq the gateway holds, for a node whose clock stepped back.
    assert_eq!(error_of(&body).last_seq, Some(5));
    // The view catches up within the merge window.
    let mut found = Vec::new();
    for _ in 0..50 {
        let (status, _, body) = h
            .call(
                "GET",
                "/v1/services/molt-provider",
                Some(&bearer),
                Vec::new(),
            )
            .await;
        assert_eq!(status, 200);
        let answer: coord::ServiceAnswer = serde_json::from_slice(&body).unwrap();
        found = answer.services;
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].port, 8443);
    assert_eq!(found[0].node, "gpu-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advert_of_0_0_0_0_is_accepted_and_filled_with_the_address_the_gateway_sees() {
    let h = harness(64).await;
    let secret = token(&h.store, TOKEN_ID, 1, super::unix_now() + 3600);
    let (_, body) = h.join(TOKEN_ID, &secret, "gpu-1", 1).await;
    let joined: JoinResponse = serde_json::from_slice(&body).unwrap();
    let bearer = joined.session.bearer().to_string();
    let advert = serde_json::to_vec(&serde_json::json!({
        "node_id": joined.node_id.to_string(),
        "seq": 5,
        "endpoints": ["0.0.0.0:51999"],
        "services": [],
        "gpus": null,
    }))
    .unwrap();
    let (status, _, body) = h.call("PUT", "/v1/self", Some(&bearer), advert).await;
    assert_eq!(status, 204, "{}", String::from_utf8_lossy(&body));
    let row = h.store.find_node("gpu-1").unwrap().unwrap();
    assert_eq!(
        row.endpoints,
        vec!["127.0.0.1:51999".parse::<SocketAddr>().unwrap()]
    );
}

#[test]
fn the_gateways_tls_certificate_is_valid_for_a_year_from_a_day_back() {
    let (leaf, _) = tls::issue_leaf(&root_pkcs8(), &["127.0.0.1".to_owned()], NOW).unwrap();
    let end = tls::not_after(&leaf).expect("notAfter parses");
    assert!(
        (NOW + 364 * 86_400..=NOW + 365 * 86_400).contains(&end),
        "expires {} days after issue",
        (end as i64 - NOW as i64) / 86_400
    );
    // It verifies under the CA (the chain a joining node checks) a day back and a year on.
    let ca = tls::pem_to_der(&tls::ca_pem(&root_pkcs8()).unwrap()).unwrap();
    use rustls::client::danger::ServerCertVerifier as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca))
        .unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let leaf = rustls::pki_types::CertificateDer::from(leaf);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let at = |unix: u64| {
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &name,
                &[],
                rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(unix)),
            )
            .is_ok()
    };
    assert!(at(NOW - 3_600), "valid an hour before issue");
    assert!(at(NOW + 300 * 86_400));
    assert!(!at(NOW + 400 * 86_400), "expired after a year");
}

#[test]
fn token_ids_in_the_store_are_the_text_nodes_send() {
    let id = TokenId([0, 0, 0, 0, 0, 0, 0, 0xa1]);
    assert_eq!(id.to_string(), TOKEN_ID);
}

#[test]
fn the_gateway_section_has_its_defaults_and_checks_the_pool() {
    let base = "[node]\nname = \"gw\"\n[network]\nprovider = \"wireguard\"\n[network.wireguard]\naddress = \"10.100.0.1/16\"\n";
    let config =
        crate::config::parse_bytes(std::path::Path::new("t.toml"), base.as_bytes().to_vec())
            .unwrap();
    let gw = &config.gateway;
    assert!(!gw.enabled);
    assert_eq!(gw.listen, "0.0.0.0:443".parse().unwrap());
    assert_eq!(gw.address_pool, pool());
    assert_eq!(gw.record_lifetime, Duration::from_secs(30 * 86_400));
    assert_eq!(gw.max_sessions, 16_384);
    assert_eq!(
        super::public_url(&config).unwrap(),
        "https://10.100.0.1:443"
    );
    let outside = format!("{base}[gateway]\nenabled = true\naddress_pool = \"10.200.0.0/24\"\n");
    let errors = crate::config::parse_bytes(std::path::Path::new("t.toml"), outside.into_bytes())
        .unwrap_err()
        .to_string();
    assert!(errors.contains("gateway.address_pool"), "{errors}");
}

fn gateway_config(dir: &std::path::Path) -> crate::config::Config {
    let text = format!(
        "[node]\nname = \"gw\"\nstate_dir = \"{0}/state\"\n[network]\nprovider = \"wireguard\"\n[network.wireguard]\naddress = \"10.100.0.1/16\"\nprivate_key_file = \"{0}/wg.key\"\n[gateway]\nenabled = true\nlisten = \"127.0.0.1:0\"\npublic_url = \"https://203.0.113.1:8443\"\n",
        dir.display()
    );
    crate::config::parse_bytes(std::path::Path::new("t.toml"), text.into_bytes()).unwrap()
}

#[test]
fn init_runs_once_and_a_token_carries_the_root_and_url_but_the_store_only_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path());
    let done = super::init(&config, NOW).unwrap();
    let again = super::init(&config, NOW).unwrap_err();
    assert!(!again.transient);
    assert!(
        again.message.contains("already initialised"),
        "{}",
        again.message
    );
    let paths = super::Paths::new(&config.node.state_dir);
    use std::os::unix::fs::PermissionsExt;
    for secret in [&paths.root_key, &paths.signer_key] {
        let mode = std::fs::metadata(secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", secret.display());
    }
    let (token, expires_at) =
        super::create_token(&config, Duration::from_secs(3600), 1, NOW).unwrap();
    assert_eq!(expires_at, NOW + 3600);
    assert_eq!(token.root, done.root);
    assert_eq!(token.urls, vec!["https://203.0.113.1:8443".to_owned()]);
    let parsed: coord::JoinToken = token.to_string().parse().unwrap();
    assert_eq!(parsed, token);
    // Without the root key (moved offline) the root still comes from ca.pem.
    std::fs::remove_file(&paths.root_key).unwrap();
    assert_eq!(super::root_of(&paths).unwrap(), done.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_gateway_registers_itself_as_node_and_gateway_and_writes_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path());
    super::init(&config, NOW).unwrap();
    let running = super::start(&config, key(77)).await.unwrap();
    let paths = super::Paths::new(&config.node.state_dir);
    let session: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&paths.session_file).unwrap()).unwrap();
    assert_eq!(session["address"], "10.100.0.1");
    assert_eq!(session["gateways"][0], "https://203.0.113.1:8443");
    let bearer: coord::Session = session["session"].as_str().unwrap().parse().unwrap();
    assert!(
        running
            .view
            .session_valid(bearer.node_id, &bearer.secret.hash())
    );
    let own = running.view.record(bearer.node_id).unwrap();
    assert_eq!(own.roles, vec![Role::Node, Role::Gateway]);
    assert_eq!(own.addresses, vec!["10.100.0.1".parse::<IpAddr>().unwrap()]);
    // A restart keeps the same node, with a new session and a higher serial.
    drop(running);
    let running = super::start(&config, key(77)).await.unwrap();
    let again = running.view.record(bearer.node_id).unwrap();
    assert_eq!(again.serial, own.serial + 1);
    assert!(
        !running
            .view
            .session_valid(bearer.node_id, &bearer.secret.hash())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_re_signed_with_a_higher_serial_before_they_expire() {
    let h = harness(8).await;
    let secret = token(&h.store, TOKEN_ID, 1, super::unix_now() + 3600);
    let (status, body) = h.join(TOKEN_ID, &secret, "gpu-1", 1).await;
    assert_eq!(status, 200);
    let joined: JoinResponse = serde_json::from_slice(&body).unwrap();
    while h.view.record(joined.node_id).is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gateway = h.gateway();
    let now = super::unix_now();
    assert_eq!(
        gateway.resign_due(now).await,
        0,
        "fresh records are left alone"
    );
    let later = now + 16 * 86_400;
    assert_eq!(gateway.resign_due(later).await, 1);
    while h.view.record(joined.node_id).unwrap().serial == joined.record.serial {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resigned = h.view.record(joined.node_id).unwrap();
    assert_eq!(resigned.serial, joined.record.serial + 1);
    assert_eq!(resigned.not_after, later + 30 * 86_400);
    assert_eq!(resigned.wg_key, joined.record.wg_key);
    assert_eq!(resigned.addresses, joined.record.addresses);
}

#[test]
fn a_large_answer_is_gzipped_once_and_a_small_one_is_not() {
    let view = view_at(40);
    let snapshot = view.snapshot();
    assert!(snapshot.json.len() > super::view::GZIP_OVER);
    let zipped = snapshot.gzip().unwrap().clone();
    assert!(zipped.len() < snapshot.json.len());
    assert_eq!(
        snapshot.gzip().unwrap().as_ptr(),
        zipped.as_ptr(),
        "compressed once"
    );
    let mut unzipped = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&zipped[..]),
        &mut unzipped,
    )
    .unwrap();
    assert_eq!(unzipped, snapshot.json);
    assert!(view.empty(40).gzip().is_none());
}

#[test]
fn the_address_the_gateway_sees_fills_an_unspecified_endpoint_and_is_added_behind_nat() {
    let source: IpAddr = "198.51.100.9".parse().unwrap();
    let mut wildcard = vec!["0.0.0.0:51820".parse().unwrap()];
    super::server::fill_source(&mut wildcard, source);
    assert_eq!(
        wildcard,
        vec!["198.51.100.9:51820".parse::<SocketAddr>().unwrap()]
    );

    let mut behind_nat = vec!["192.168.1.5:51820".parse().unwrap()];
    super::server::fill_source(&mut behind_nat, source);
    assert_eq!(
        behind_nat,
        vec![
            "192.168.1.5:51820".parse::<SocketAddr>().unwrap(),
            "198.51.100.9:51820".parse().unwrap()
        ],
        "its own address first, the one seen added"
    );

    let mut direct = vec!["198.51.100.9:51820".parse().unwrap()];
    super::server::fill_source(&mut direct, source);
    assert_eq!(
        direct.len(),
        1,
        "nothing added when the node already lists it"
    );

    let mut none = Vec::new();
    super::server::fill_source(&mut none, source);
    assert!(none.is_empty(), "no port to go with it");
}

#[test]
fn a_directly_reachable_node_keeps_its_preferred_endpoint_first() {
    let source: IpAddr = "198.51.100.9".parse().unwrap();
    let listed: Vec<SocketAddr> = vec![
        "198.51.100.9:51820".parse().unwrap(),
        "192.168.1.5:51820".parse().unwrap(),
        "[2001:db8::5]:51820".parse().unwrap(),
    ];
    let mut direct = listed.clone();
    super::server::fill_source(&mut direct, source);
    assert_eq!(direct, listed, "the node's order, unchanged");

    let mut behind_nat: Vec<SocketAddr> = vec![
        "192.168.1.5:51821".parse().unwrap(),
        "10.0.0.5:51820".parse().unwrap(),
    ];
    super::server::fill_source(&mut behind_nat, "203.0.113.7".parse().unwrap());
    assert_eq!(
        behind_nat,
        vec![
            "192.168.1.5:51821".parse::<SocketAddr>().unwrap(),
            "10.0.0.5:51820".parse().unwrap(),
            "203.0.113.7:51821".parse().unwrap(),
        ],
        "only the address the gateway added goes last"
    );
}

#[test]
fn an_enabled_gateway_advertises_the_gateway_service_even_when_not_declared() {
    let text = "[node]\nname = \"gw\"\n[network]\nprovider = \"wireguard\"\n[network.wireguard]\naddress = \"10.100.0.1/16\"\n[gateway]\nenabled = true\nlisten = \"0.0.0.0:9443\"\n";
    let config =
        crate::config::parse_bytes(std::path::Path::new("t.toml"), text.as_bytes().to_vec())
            .unwrap();
    let ads: Vec<(String, u16)> = config
        .services
        .iter()
        .map(|(name, spec)| (name.to_string(), spec.port))
        .collect();
    assert_eq!(ads, vec![("gateway".to_owned(), 9443)]);
}

#[tokio::test]
async fn tokens_and_nodes_through_the_store_trait() {
    use super::store::{NewToken, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(&dir);
    let secret = Secret32([5; 32]);
    store
        .create_token(NewToken {
            id: "00000000000000b1".into(),
            hash: coord::token_hash(&secret),
            expires_at: NOW + 60,
            uses: 1,
            now: NOW,
        })
        .await
        .unwrap();
    store
        .join(txn(Some(("00000000000000b1", &secret)), "gpu-9", 9, NOW))
        .await
        .unwrap();
    let nodes = Store::nodes(&store).await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].name, "gpu-9");
    assert!(!nodes[0].revoked);
}

/// The issue's wire targets: a 1,000-peer snapshot <= 160 KiB, a one-peer delta and a
/// reconnect with a current cursor <= 1 KiB (measured: 414 KiB JSON, 93 KiB gzipped; 441 B;
/// 144 B).
#[test]
fn a_thousand_peer_snapshot_gzipped_and_a_one_peer_delta_stay_within_the_wire_targets() {
    let view = View::new(STORE_ID, vec!["https://203.0.113.1:443".into()]);
    let mut changes = Vec::new();
    for n in 1..=1000u64 {
        let mut r = record(n, n as u32);
        r.addresses = vec![IpAddr::from([10, 100, (n >> 8) as u8, n as u8])];
        r.name = format!("gpu-node-{n:04}");
        let r = coord::sign_record(r.fields(), &signer_pkcs8()).unwrap();
        changes.push((2 * n - 1, Change::Record(r)));
        changes.push((
            2 * n,
            Change::Advert(coord::Advert {
                node_id: NodeId(n),
                seq: 1,
                endpoints: vec![SocketAddr::from((
                    [198, 51, (n >> 8) as u8, n as u8],
                    51820,
                ))],
                services: vec![coord::AdvertService {
                    name: "molt-provider".into(),
                    port: 8443,
                }],
                gpus: None,
            }),
        ));
    }
    view.reset(0, Default::default(), Vec::new());
    view.apply(changes);
    let snap = view.snapshot();
    let zipped = snap.gzip().unwrap().len();
    assert!(zipped <= 160 * 1024, "snapshot gzip {zipped} B");
    view.apply(vec![(2001, Change::Record(record(1001, 1001)))]);
    let delta = view
        .answer(Some(Cursor {
            store_id: STORE_ID,
            rev: 2000,
        }))
        .unwrap();
    assert!(delta.json.len() <= 1024, "delta {} B", delta.json.len());
    let empty = view.empty(2001).json.len();
    assert!(empty <= 1024, "empty {empty} B");
}

// ---- several gateways on one store ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_ahead_of_the_view_waits_for_it_and_never_gets_a_snapshot() {
    let view = Arc::new(view_at(3));
    // Another gateway on the same store is at 5 already: its node asks this one.
    let ahead = Cursor {
        store_id: STORE_ID,
        rev: 5,
    };
    assert!(view.answer(Some(ahead)).is_none(), "waits, no snapshot");
    // The view catches up past it: only what came after 5.
    let poll = {
        let view = Arc::clone(&view);
        tokio::spawn(async move {
            super::server::poll(&view, Some(ahead), Duration::from_secs(10)).await
        })
    };
    view.apply(vec![
        (4, Change::Record(record(4, 4))),
        (5, Change::Record(record(5, 5))),
    ]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!poll.is_finished(), "at 5 it is current: still waiting");
    view.apply(vec![(6, Change::Record(record(6, 6)))]);
    let update = decode(&poll.await.unwrap().json);
    assert_eq!(update.kind, UpdateKind::Delta);
    assert_eq!(update.cursor.rev, 6);
    let ids: Vec<_> = update.records.iter().map(|r| r.node_id).collect();
    assert_eq!(ids, vec![NodeId(6)]);
    assert_eq!(view.role_doc().snapshots_sent, 0);
}

#[test]
fn every_update_carries_the_live_gateways_and_follows_their_changes() {
    let view = view_at(2);
    let cursor = Cursor {
        store_id: STORE_ID,
        rev: 1,
    };
    assert_eq!(
        decode(&view.snapshot().json).gateways,
        vec!["https://127.0.0.1:1".to_owned()]
    );
    let _ = view.answer(Some(cursor));
    let both = vec![
        "https://127.0.0.1:1".to_owned(),
        "https://127.0.0.2:1".to_owned(),
    ];
    view.set_gateways(both.clone());
    // Cached answers made with the old list are not served again.
    assert_eq!(decode(&view.snapshot().json).gateways, both);
    assert_eq!(
        decode(&view.answer(Some(cursor)).unwrap().json).gateways,
        both
    );
    assert_eq!(decode(&view.empty(2).json).gateways, both);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joined_through_another_gateway_can_poll_this_one_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(&dir));
    let view = Arc::new(View::new(STORE_ID, Vec::new()));
    view::load(&*store, &view).await.unwrap();
    let mine = txn(None, "here", 1, NOW);
    store.join_blocking(mine).unwrap();
    view.add_session(NodeId(1), [9; 32]);
    let feed = tokio::spawn(view::feed(Arc::clone(&store), Arc::clone(&view)));
    // Another gateway (another process on the same store) takes a join.
    let elsewhere = SqliteStore::open(&dir.path().join("store.sqlite")).unwrap();
    let joined = elsewhere.join_blocking(txn(None, "there", 2, NOW)).unwrap();
    let node = joined.record.node_id;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !view.session_valid(node, &[2; 32]) {
        assert!(
            std::time::Instant::now() < deadline,
            "the other gateway's node is not known here"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A session this gateway set itself is kept, even where the store's copy differs.
    assert!(view.session_valid(NodeId(1), &[9; 32]));
    feed.abort();
}

#[test]
fn a_signer_added_then_revoked_has_its_records_re_signed_first_and_its_cert_expired() {
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path());
    super::init(&config, NOW).unwrap();
    let out = dir.path().join("gw-b");
    let added = super::admin::signer_add(
        &config,
        "gw-b",
        "https://203.0.113.2:8443",
        &["10.100.0.2".parse().unwrap()],
        &out,
        NOW,
    )
    .unwrap();
    assert_eq!(
        added.tls_names,
        vec!["10.100.0.2".to_owned(), "203.0.113.2".to_owned()]
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out), 0o700);
    assert_eq!(mode(&out.join("signer.key")), 0o600);
    assert_eq!(mode(&out.join("tls.key")), 0o600);
    let paths = super::Paths::new(&config.node.state_dir);
    assert_eq!(
        std::fs::read(out.join("ca.pem")).unwrap(),
        std::fs::read(&paths.ca_pem).unwrap()
    );
    // The new gateway's leaf chains to the cluster CA and names its URL's host.
    let leaf = std::fs::read(out.join("tls.crt")).unwrap();
    assert!(tls::not_after(&leaf).is_some());
    let again = super::admin::signer_add(
        &config,
        "gw-b",
        "https://203.0.113.2:8443",
        &[],
        &dir.path().join("x"),
        NOW,
    );
    assert!(again.unwrap_err().message.contains("exists already"));
    let names: Vec<_> = super::admin::signers(&config)
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"gw-b".to_owned()));

    // A node whose record gw-b signed.
    let b = Signer::load(&out.join("signer.key")).unwrap();
    let store = SqliteStore::open(&paths.store).unwrap();
    let mut joined = txn(None, "node-b", 5, NOW);
    let pkcs8 = b.pkcs8.clone();
    joined.sign = Box::new(move |node_id, address, serial| {
        coord::sign_record(
            RecordFields {
                node_id,
                name: "node-b".into(),
                wg_key: key(5),
                addresses: vec![address],
                roles: vec![Role::Node],
                serial,
                not_after: NOW + 1000,
                gateway_url: None,
            },
            &pkcs8,
        )
        .map_err(|e| e.to_string())
    });
    let record = store.join_blocking(joined).unwrap().record;
    assert_eq!(record.signer, b.key_id);

    let own = Signer::load(&paths.signer_key).unwrap();
    let own_name = config.node.name.as_str().to_owned();
    let refused = super::admin::signer_revoke(&config, &own_name, NOW).unwrap_err();
    assert!(
        refused.message.contains("own signer"),
        "{}",
        refused.message
    );
    let revoked = super::admin::signer_revoke(&config, "gw-b", NOW + 10).unwrap();
    assert_eq!(revoked.resigned, 1);
    assert_eq!(revoked.cert.serial, 2);
    assert!(
        revoked.cert.not_after < NOW + 10,
        "an expired cert is the revocation"
    );
    let (_, state) = store.snapshot_blocking().unwrap();
    let now_signed = state
        .records
        .iter()
        .find(|r| r.node_id == record.node_id)
        .unwrap();
    assert_eq!(now_signed.signer, own.key_id, "re-signed by this gateway");
    assert_eq!(now_signed.serial, record.serial + 1);
    let cert = state.signers.iter().find(|c| c.key_id == b.key_id).unwrap();
    assert_eq!(cert.serial, 2);
    // The re-signed record came before the revocation in the change feed.
    let changes = store.changes_since_blocking(0).unwrap().unwrap();
    let pos = |f: &dyn Fn(&Change) -> bool| changes.iter().position(|(_, c)| f(c)).unwrap();
    let resigned_at = pos(
        &|c| matches!(c, Change::Record(r) if r.node_id == record.node_id && r.signer == own.key_id),
    );
    let revoked_at =
        pos(&|c| matches!(c, Change::Signer(s) if s.key_id == b.key_id && s.serial == 2));
    assert!(resigned_at < revoked_at);

    let status = super::admin::status(&config, NOW + 10).unwrap();
    assert!(matches!(
        status.store,
        super::admin::StoreDoc::Sqlite { .. }
    ));
    assert!(status.writable);
    assert!(status.gateways.is_empty());
    assert!(status.signers.iter().any(|s| s.name == "gw-b" && s.revoked));
    assert_eq!(
        status.store_id,
        format!("{:016x}", super::Store::store_id(&store))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_own_record_carries_its_signed_url_through_re_signing_and_a_nodes_does_not() {
    let h = harness(8).await;
    let gateway = h.gateway();
    let now = super::unix_now();
    let url = "https://gw-2.example:8443".to_string();
    let mut own = txn(None, "gw-2", 2, now);
    own.sign = gateway.sign_fn(
        "gw-2".into(),
        key(2),
        vec![Role::Node, Role::Gateway],
        Some(url.clone()),
        now,
    );
    let own = super::store::Store::join(&*h.store, own)
        .await
        .unwrap()
        .record;
    assert_eq!(own.gateway_url.as_deref(), Some(url.as_str()));
    // A node's record never carries one, even if a URL is passed by mistake.
    let mut node = txn(None, "gpu-1", 1, now);
    node.sign = gateway.sign_fn(
        "gpu-1".into(),
        key(1),
        vec![Role::Node],
        Some(url.clone()),
        now,
    );
    let node = super::store::Store::join(&*h.store, node)
        .await
        .unwrap()
        .record;
    assert_eq!(node.gateway_url, None);

    while h.view.record(own.node_id).is_none() || h.view.record(node.node_id).is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gateway.resign_due(now + 16 * 86_400).await, 2);
    while h.view.record(own.node_id).unwrap().serial == own.serial {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resigned = h.view.record(own.node_id).unwrap();
    assert_eq!(resigned.gateway_url.as_deref(), Some(url.as_str()));
    let cert = coord::sign_signer(
        coord::public_key_of_pkcs8(&signer_pkcs8()).unwrap(),
        "gw",
        1,
        NOW + 1_000_000,
        &root_pkcs8(),
    )
    .unwrap();
    resigned.verify(&cert).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_gateway_signs_its_public_url_into_its_own_record() {
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path());
    super::init(&config, NOW).unwrap();
    let running = super::start(&config, key(77)).await.unwrap();
    let own = running
        .view
        .records()
        .into_iter()
        .find(|r| r.has_role(Role::Gateway))
        .unwrap();
    assert_eq!(own.gateway_url.as_deref(), Some("https://203.0.113.1:8443"));
}

#[tokio::test]
async fn a_cursor_still_ahead_after_the_whole_wait_gets_a_snapshot_as_after_a_restored_backup() {
    let view = view_at(3);
    let ahead = Cursor {
        store_id: STORE_ID,
        rev: 9,
    };
    let answer = decode(
        &super::server::poll(&view, Some(ahead), Duration::from_millis(100))
            .await
            .json,
    );
    assert_eq!(answer.kind, UpdateKind::Snapshot);
    assert_eq!(answer.cursor.rev, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joined_again_through_another_gateway_polls_this_one_with_its_new_session() {
    let h = harness(64).await;
    let secret = token(&h.store, TOKEN_ID, 2, super::unix_now() + 3600);
    let (status, body) = h.join(TOKEN_ID, &secret, "gpu-1", 1).await;
    assert_eq!(status, 200);
    let first: JoinResponse = serde_json::from_slice(&body).unwrap();
    // Its answer was lost: the same join again through another gateway (another process on
    // this store) gives the same node a new session, which this gateway's view has not seen.
    let elsewhere = SqliteStore::open(&h._dir.path().join("store.sqlite")).unwrap();
    let again = coord::Session {
        node_id: first.session.node_id,
        secret: Secret32(super::random_32()),
    };
    let mut retry = txn(Some((TOKEN_ID, &secret)), "gpu-1", 1, super::unix_now());
    retry.session_hash = again.secret.hash();
    let rejoined = elsewhere.join_blocking(retry).unwrap();
    assert_eq!(rejoined.record.node_id, first.session.node_id);
    let (status, _, body) = h
        .call(
            "GET",
            "/v1/peers",
            Some(again.bearer().as_ref()),
            Vec::new(),
        )
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // A wrong secret is still refused.
    let wrong = coord::Session {
        node_id: first.session.node_id,
        secret: Secret32([7; 32]),
    };
    let (status, _, _) = h
        .call(
            "GET",
            "/v1/peers",
            Some(wrong.bearer().as_ref()),
            Vec::new(),
        )
        .await;
    assert_eq!(status, 401);
}

#[test]
fn a_session_read_from_the_store_before_a_revocation_is_not_kept_after_it() {
    let view = view_at(1);
    let revocation = coord::sign_revocation(NodeId(1), u64::MAX, &signer_pkcs8()).unwrap();
    view.apply(vec![(2, Change::Revocation(revocation))]);
    // A copy of the sessions read just before the revocation reached the view.
    assert!(!view.add_stored_session(NodeId(1), [1; 32]));
    view.add_unknown_sessions(vec![(NodeId(1), [1; 32])]);
    assert!(!view.session_valid(NodeId(1), &[1; 32]));
    assert!(view.add_stored_session(NodeId(2), [2; 32]));
    assert!(view.session_valid(NodeId(2), &[2; 32]));
}

/// Gateway B's signer (seed 5), its cert from the root (serial, not_after).
fn b_signer(serial: u64, not_after: u64) -> (Vec<u8>, coord::SignerCert) {
    let pkcs8 = coord::ed25519_pkcs8_from_seed(&[5; 32]).to_vec();
    let public = coord::public_key_of_pkcs8(&pkcs8).unwrap();
    let cert = coord::sign_signer(public, "gw-b", serial, not_after, &root_pkcs8()).unwrap();
    (pkcs8, cert)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_revoked_gateway_signed_are_re_signed_by_a_live_one_though_not_near_expiry() {
    let h = harness(8).await;
    let now = super::unix_now();
    let (b_pkcs8, b_cert) = b_signer(1, now + 1_000_000);
    h.store.put_signer_blocking(b_cert).unwrap();
    // Gateway B admitted a node, then B's signer was revoked (its cert re-issued expired).
    let mut joined = txn(None, "node-b", 6, now);
    joined.sign = Box::new(move |node_id, address, serial| {
        coord::sign_record(
            RecordFields {
                node_id,
                name: "node-b".into(),
                wg_key: key(6),
                addresses: vec![address],
                roles: vec![Role::Node],
                serial,
                not_after: now + 30 * 86_400,
                gateway_url: None,
            },
            &b_pkcs8,
        )
        .map_err(|e| e.to_string())
    });
    let record = h.store.join_blocking(joined).unwrap().record;
    h.store.put_signer_blocking(b_signer(2, now - 1).1).unwrap();
    while h.view.head() < h.store.head_now().unwrap() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gateway = h.gateway();
    assert_eq!(gateway.resign_due(now).await, 1);
    while h.view.record(record.node_id).unwrap().serial == record.serial {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resigned = h.view.record(record.node_id).unwrap();
    assert_eq!(resigned.signer, gateway.signer.key_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_signer_was_revoked_admits_no_node_and_re_signs_nothing() {
    let h = harness(8).await;
    let now = super::unix_now();
    let public = coord::public_key_of_pkcs8(&signer_pkcs8()).unwrap();
    let revoked = coord::sign_signer(public, "gw", 2, now - 1, &root_pkcs8()).unwrap();
    h.store.put_signer_blocking(revoked).unwrap();
    while h.view.head() < h.store.head_now().unwrap() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secret = token(&h.store, TOKEN_ID, 2, now + 3600);
    let (status, body) = h.join(TOKEN_ID, &secret, "gpu-1", 1).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("signer is revoked"));
    let gateway = h.gateway();
    assert_eq!(gateway.resign_due(now + 29 * 86_400).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_behind_its_store_sends_a_node_elsewhere_rather_than_roll_it_back() {
    let h = harness_fed(8, false).await;
    let now = super::unix_now();
    h.store.join_blocking(txn(None, "gw-self", 1, now)).unwrap();
    view::load(&*h.store, &h.view).await.unwrap();
    let bearer = coord::Session {
        node_id: NodeId(1),
        secret: Secret32([1; 32]),
    };
    h.view.add_session(NodeId(1), bearer.secret.hash());
    // Another gateway wrote after this view stopped following the store.
    let joined = h
        .store
        .join_blocking(txn(None, "elsewhere", 2, now))
        .unwrap();
    let cursor = Cursor {
        store_id: STORE_ID,
        rev: joined.rev,
    };
    let (status, _, body) = h
        .call(
            "GET",
            &format!("/v1/peers?cursor={cursor}&wait=1"),
            Some(bearer.bearer().as_str()),
            Vec::new(),
        )
        .await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(h.view.role_doc().snapshots_sent, 0);
    // A cursor the store never reached (a restored backup): a snapshot.
    let beyond = Cursor {
        store_id: STORE_ID,
        rev: joined.rev + 10,
    };
    let (status, _, body) = h
        .call(
            "GET",
            &format!("/v1/peers?cursor={beyond}&wait=1"),
            Some(bearer.bearer().as_str()),
            Vec::new(),
        )
        .await;
    assert_eq!(status, 200);
    let update: Update = serde_json::from_slice(&body).unwrap();
    assert_eq!(update.kind, UpdateKind::Snapshot);
}
