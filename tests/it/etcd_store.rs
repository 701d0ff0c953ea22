//! The etcd store against a real three-member etcd cluster (tests/support/etcd.rs): two
//! gateways' stores on one prefix, racing joins, member and quorum loss, compaction, presence.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use clawnode::core::coord::{self, NodeId, RecordFields, Role, Secret32};
use clawnode::core::peer_diff::PeerKey;
use clawnode::gateway::SqliteStore;
use clawnode::gateway::etcd::{EtcdSettings, EtcdStore, GatewayPresence, PRESENCE_TTL_S};
use clawnode::gateway::store::{
    Change, Compacted, JoinError, JoinTxn, NewToken, SignFn, Store, TokenClaim,
};

use crate::support::etcd::EtcdCluster;

const NOW: u64 = 1_800_000_000;
const TOKEN: &str = "00000000000000aa";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn settings(cluster: &EtcdCluster) -> EtcdSettings {
    EtcdSettings {
        endpoints: cluster.endpoints(),
        prefix: "/clawbernetes/".to_owned(),
        ca_file: None,
        cert_file: None,
        key_file: None,
    }
}

/// A three-member cluster and the settings to reach it; `None` (skip the test) where etcd is
/// not installed.
fn three_members() -> Option<(EtcdCluster, EtcdSettings)> {
    if EtcdCluster::missing() {
        return None;
    }
    let cluster = EtcdCluster::start(3);
    let settings = settings(&cluster);
    Some((cluster, settings))
}

/// `gateway init`, then one store per gateway.
async fn stores(settings: &EtcdSettings, n: usize) -> Vec<EtcdStore> {
    assert!(EtcdStore::create(settings, 42).await.unwrap());
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(EtcdStore::open(settings).await.unwrap());
    }
    out
}

fn key(n: u32) -> PeerKey {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    bytes[31] = 1;
    PeerKey(bytes)
}

fn signer_pkcs8() -> Vec<u8> {
    coord::ed25519_pkcs8_from_seed(&[2; 32]).to_vec()
}

fn sign(name: &str, key: PeerKey) -> SignFn {
    let name = name.to_owned();
    let pkcs8 = signer_pkcs8();
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
            &pkcs8,
        )
        .map_err(|e| e.to_string())
    })
}

fn txn(token: Option<&Secret32>, name: &str, n: u32) -> JoinTxn {
    JoinTxn {
        token: token.map(|secret| TokenClaim {
            id: TOKEN.to_owned(),
            hash: coord::token_hash(secret),
        }),
        now: NOW,
        name: name.to_owned(),
        wg_key: coord::b64::wg_key_to_string(&key(n)),
        requested_address: None,
        session_hash: [n as u8; 32],
        pool: "10.100.0.0/16".parse().unwrap(),
        reserved: vec!["10.100.0.1".parse().unwrap()],
        sign: sign(name, key(n)),
    }
}

async fn token(store: &impl Store, uses: u32) -> Secret32 {
    let secret = Secret32([9; 32]);
    store
        .create_token(NewToken {
            id: TOKEN.to_owned(),
            hash: coord::token_hash(&secret),
            expires_at: NOW + 3600,
            uses,
            now: NOW,
        })
        .await
        .unwrap();
    secret
}

#[test]
fn the_test_cluster_survives_a_member_and_regains_quorum() {
    if EtcdCluster::missing() {
        return;
    }
    let mut cluster = EtcdCluster::start(3);
    assert_eq!(cluster.endpoints().len(), 3);
    assert!(cluster.etcdctl(&["put", "/t/a", "1"]).status.success());
    cluster.kill(2);
    // Member 2 may have been the leader: the others elect a new one first.
    let started = Instant::now();
    while !cluster.etcdctl(&["put", "/t/a", "2"]).status.success() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no write after losing one member"
        );
    }
    cluster.restart(2);
    cluster.kill_quorum();
    let refused = cluster.etcdctl(&["--command-timeout=2s", "put", "/t/a", "3"]);
    assert!(
        !refused.status.success(),
        "a write without quorum succeeded"
    );
    cluster.restore_quorum();
    // (The refused put may still have been committed once quorum returned: it timed out.)
    assert!(cluster.etcdctl(&["put", "/t/a", "4"]).status.success());
    let out = cluster.etcdctl(&["get", "/t/a", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4");
}

#[test]
fn the_test_cluster_runs_inside_a_network_namespace() {
    if EtcdCluster::missing() {
        return;
    }
    let ns = format!("clawetcd{}", std::process::id());
    let made = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("ip netns add {ns} && ip -n {ns} link set lo up"),
        ])
        .status()
        .unwrap();
    assert!(made.success(), "ip netns add (needs root)");
    let result = std::panic::catch_unwind(|| {
        let cluster = EtcdCluster::start_on(3, "127.0.0.1", Some(&ns));
        assert!(cluster.etcdctl(&["put", "/t/ns", "1"]).status.success());
        // Not reachable from outside the namespace.
        let outside = std::net::TcpStream::connect_timeout(
            &cluster.endpoints()[0]
                .trim_start_matches("http://")
                .parse()
                .unwrap(),
            Duration::from_millis(300),
        );
        assert!(outside.is_err());
    });
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .status();
    result.unwrap();
}

#[test]
fn a_cluster_that_requires_tls_and_a_client_certificate_is_used_with_them() {
    if EtcdCluster::missing() {
        return;
    }
    let cluster = EtcdCluster::start_tls(3);
    let tls = cluster.tls().unwrap().clone();
    let with_tls = EtcdSettings {
        ca_file: Some(tls.ca.clone()),
        cert_file: Some(tls.cert.clone()),
        key_file: Some(tls.key.clone()),
        ..settings(&cluster)
    };
    runtime().block_on(async {
        let s = stores(&with_tls, 1).await;
        let secret = token(&s[0], 1).await;
        s[0].join(txn(Some(&secret), "tls", 1)).await.unwrap();
        // Without the client certificate the cluster refuses us, and says so.
        let anonymous = EtcdSettings {
            cert_file: None,
            key_file: None,
            ..with_tls.clone()
        };
        let refused = EtcdStore::open(&anonymous).await.err().unwrap();
        println!("without a client certificate: {refused}");
        assert!(refused.message.contains("etcd_cert_file"), "{refused}");
    });
}

#[test]
fn a_prefix_without_init_is_refused_and_init_runs_once() {
    let Some((_cluster, settings)) = three_members() else {
        return;
    };
    runtime().block_on(async {
        let refused = EtcdStore::open(&settings).await.err().unwrap();
        assert!(!refused.transient);
        assert!(
            refused.message.contains("no cluster under /clawbernetes/")
                && refused.message.contains("gateway init"),
            "{}",
            refused.message
        );
        assert!(EtcdStore::create(&settings, 7).await.unwrap());
        assert!(!EtcdStore::create(&settings, 8).await.unwrap());
        assert_eq!(EtcdStore::open(&settings).await.unwrap().store_id(), 7);
    });
}

#[test]
fn two_gateways_see_each_others_changes_through_wait_and_changes_since() {
    let Some((_cluster, settings)) = three_members() else {
        return;
    };
    runtime().block_on(async {
        let s = stores(&settings, 2).await;
        let (a, b) = (&s[0], &s[1]);
        let secret = token(a, 10).await;
        let (head, _) = b.snapshot().await.unwrap();
        let waiting = b.wait(head);
        let joined = a.join(txn(Some(&secret), "n1", 1)).await.unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the other gateway's wait never woke")
            .unwrap();
        assert_eq!(woke, joined.rev);
        let changes = b.changes_since(head).await.unwrap().unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(
            changes[0],
            (joined.rev, Change::Record(joined.record.clone()))
        );
        // The other way round, and its sessions know the node at once.
        assert!(
            b.sessions()
                .await
                .unwrap()
                .iter()
                .any(|(id, _)| *id == joined.record.node_id)
        );
        assert_eq!(b.session(joined.record.node_id), Some([1; 32]));
        let revocation = coord::sign_revocation(joined.record.node_id, 2, &signer_pkcs8()).unwrap();
        let rev = b.revoke(revocation.clone()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), a.wait(joined.rev))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            a.changes_since(joined.rev).await.unwrap().unwrap(),
            vec![(rev, Change::Revocation(revocation))]
        );
        assert!(a.sessions().await.unwrap().is_empty());
        assert_eq!(a.session(joined.record.node_id), None);
        let (_, state) = a.snapshot().await.unwrap();
        assert!(state.records.is_empty() && state.revocations.len() == 1);
        // The revoked node's name is free again, its key and address are not.
        let again = a.join(txn(Some(&secret), "n1", 2)).await.unwrap();
        assert_ne!(again.record.addresses, joined.record.addresses);
        assert!(matches!(
            a.join(txn(Some(&secret), "n9", 1)).await,
            Err(JoinError::KeyRevoked(n)) if n == joined.record.node_id
        ));
    });
}

/// `clawnode gateway token create` writes through its own connection: a join on a gateway
/// a moment later must not be told "unknown token" because its mirror is a few ms behind.
#[test]
fn a_token_just_created_by_another_process_is_accepted_at_once() {
    let Some((_cluster, settings)) = three_members() else {
        return;
    };
    runtime().block_on(async {
        let gateway = stores(&settings, 1).await.remove(0);
        let mut cli = etcd_client::Client::connect(&settings.endpoints, None)
            .await
            .unwrap();
        for round in 0..10u32 {
            let secret = Secret32([round as u8 + 1; 32]);
            let id = format!("00000000000002{round:02x}");
            let hash: String = coord::token_hash(&secret)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let doc = format!(
                r#"{{"hash":"{hash}","expires_at":{},"uses_left":1,"created_at":{NOW}}}"#,
                NOW + 60
            );
            cli.put(format!("/clawbernetes/tokens/{id}"), doc, None)
                .await
                .unwrap();
            let n = round + 1;
            let mut t = txn(Some(&secret), &format!("t{n}"), n);
            t.token.as_mut().unwrap().id = id;
            gateway
                .join(t)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    });
}

#[test]
fn racing_joins_from_two_gateways_never_share_an_address_or_a_node_id() {
    let Some((_cluster, settings)) = three_members() else {
        return;
    };
    runtime().block_on(async {
        let s = stores(&settings, 2).await;
        let secret = token(&s[0], 1_000).await;
        let started = Instant::now();
        let racers = s.iter().enumerate().map(|(g, store)| {
            let store = store.clone();
            let secret = secret.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..100u32 {
                    let n = g as u32 * 1000 + i + 1;
                    let joined = store
                        .join(txn(Some(&secret), &format!("node-{n}"), n))
                        .await
                        .unwrap();
                    got.push((joined.record.node_id, joined.record.addresses[0]));
                }
                got
            })
        });
        let mut all = Vec::new();
        for racer in racers.collect::<Vec<_>>() {
            all.extend(racer.await.unwrap());
        }
        let elapsed = started.elapsed();
        let conflicts: u64 = s.iter().map(EtcdStore::conflicts).sum();
        println!(
            "200 racing joins from two stores: {elapsed:?} ({:.1} ms each), {conflicts} lost races decided again",
            elapsed.as_secs_f64() * 1000.0 / 200.0
        );
        let ids: BTreeSet<NodeId> = all.iter().map(|(id, _)| *id).collect();
        let addresses: BTreeSet<IpAddr> = all.iter().map(|(_, a)| *a).collect();
        assert_eq!(ids.len(), 200, "a node id was handed out twice");
        assert_eq!(addresses.len(), 200, "an address was handed out twice");
        assert!(!addresses.contains(&"10.100.0.1".parse::<IpAddr>().unwrap()));
        // Both gateways' mirrors agree, and so does etcd: 200 uses spent.
        tokio::time::timeout(Duration::from_secs(5), async {
            while s[0].nodes().await.unwrap().len() != 200 || s[1].nodes().await.unwrap().len() != 200 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        let fresh = EtcdStore::open(&settings).await.unwrap();
        assert_eq!(fresh.nodes().await.unwrap(), s[0].nodes().await.unwrap());
    });
}

#[test]
fn a_single_use_token_joined_from_two_gateways_at_once_succeeds_once() {
    let Some((_cluster, settings)) = three_members() else {
        return;
    };
    runtime().block_on(async {
        let s = stores(&settings, 2).await;
        for round in 0..5u32 {
            let secret = Secret32([round as u8 + 1; 32]);
            let id = format!("00000000000001{round:02x}");
            s[0].create_token(NewToken {
                id: id.clone(),
                hash: coord::token_hash(&secret),
                expires_at: NOW + 60,
                uses: 1,
                now: NOW,
            })
            .await
            .unwrap();
            while s[1].mirror_revision() < s[0].mirror_revision() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let attempt = |g: usize| {
                let store = s[g].clone();
                let id = id.clone();
                let n = round * 10 + g as u32 + 1;
                let mut t = txn(Some(&secret), &format!("r{n}"), n);
                t.token.as_mut().unwrap().id = id;
                async move { store.join(t).await }
            };
            let (first, second) = tokio::join!(attempt(0), attempt(1));
            let ok = [&first, &second].iter().filter(|r| r.is_ok()).count();
            assert_eq!(ok, 1, "round {round}: {first:?} / {second:?}");
            let refused = if first.is_err() { first } else { second };
            assert!(matches!(refused, Err(JoinError::TokenUsed)), "{refused:?}");
        }
    });
}

#[test]
fn a_gateway_opened_after_changes_resumes_an_older_cursor_without_a_snapshot() {
    let Some((_cluster, settings)) = three_members() else {
        return;
    };
    runtime().block_on(async {
        let s = stores(&settings, 1).await;
        let secret = token(&s[0], 10).await;
        let first = s[0].join(txn(Some(&secret), "a", 1)).await.unwrap();
        let cursor = first.rev;
        let mut later = Vec::new();
        for n in 2..5 {
            later.push(
                s[0].join(txn(Some(&secret), &format!("n{n}"), n))
                    .await
                    .unwrap(),
            );
        }
        // Writes that are not changes move the revision but are not news.
        token_with_id(&s[0], "00000000000000bb").await;
        let fresh = EtcdStore::open(&settings).await.unwrap();
        let changes = fresh
            .changes_since(cursor)
            .await
            .unwrap()
            .expect("not compacted");
        let expected: Vec<(u64, Change)> = later
            .iter()
            .map(|j| (j.rev, Change::Record(j.record.clone())))
            .collect();
        assert_eq!(changes, expected);
        // And its head is current: nothing newer to wait for.
        assert!(
            fresh
                .changes_since(later[2].rev)
                .await
                .unwrap()
                .unwrap()
                .is_empty()
        );
    });
}

async fn token_with_id(store: &impl Store, id: &str) {
    store
        .create_token(NewToken {
            id: id.to_owned(),
            hash: [1; 32],
            expires_at: NOW + 60,
            uses: 1,
            now: NOW,
        })
        .await
        .unwrap();
}

#[test]
fn after_compaction_an_old_cursor_is_told_to_take_a_snapshot() {
    let Some((_cluster, settings)) = three_members() else {
        return;
    };
    runtime().block_on(async {
        let s = stores(&settings, 2).await;
        let secret = token(&s[0], 10).await;
        let old = s[0].join(txn(Some(&secret), "a", 1)).await.unwrap();
        let newer = s[0].join(txn(Some(&secret), "b", 2)).await.unwrap();
        let head = s[0].join(txn(Some(&secret), "c", 3)).await.unwrap();
        // Nothing is old enough under the real limits.
        assert_eq!(s[0].compact(NOW).await.unwrap(), 0);
        assert!(s[0].changes_since(old.rev).await.unwrap().is_ok());
        // Keep the last revision only.
        assert!(s[0].compact_with(NOW, 1, 0).await.unwrap() > 0);
        assert_eq!(s[0].changes_since(old.rev).await.unwrap(), Err(Compacted));
        // A gateway that learns of it only from etcd says the same.
        let fresh = EtcdStore::open(&settings).await.unwrap();
        assert_eq!(
            fresh.changes_since(old.rev - 1).await.unwrap(),
            Err(Compacted)
        );
        // A current cursor still gets its changes, from the ring (once that gateway's
        // watch has delivered them).
        tokio::time::timeout(Duration::from_secs(5), s[1].wait(newer.rev))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            s[1].changes_since(newer.rev).await.unwrap().unwrap(),
            vec![(head.rev, Change::Record(head.record))]
        );
    });
}

#[test]
fn with_one_member_killed_joins_and_changes_still_succeed() {
    let Some((mut cluster, settings)) = three_members() else {
        return;
    };
    let rt = runtime();
    let (s, secret) = rt.block_on(async {
        let s = stores(&settings, 2).await;
        let secret = token(&s[0], 100).await;
        s[0].join(txn(Some(&secret), "before", 1)).await.unwrap();
        (s, secret)
    });
    for member in 0..3 {
        cluster.kill(member);
        rt.block_on(async {
            for (g, store) in s.iter().enumerate() {
                let n = 10 + member as u32 * 2 + g as u32;
                let (head, _) = s[1 - g].snapshot().await.unwrap();
                let started = Instant::now();
                let joined = store
                    .join(txn(Some(&secret), &format!("m{n}"), n))
                    .await
                    .unwrap_or_else(|e| panic!("member {member} down, gateway {g}: {e}"));
                tokio::time::timeout(Duration::from_secs(5), s[1 - g].wait(head))
                    .await
                    .expect("the other gateway did not see the join")
                    .unwrap();
                println!(
                    "member {member} down: a join through gateway {g} took {:?}",
                    started.elapsed()
                );
                assert!(joined.rev > head);
            }
        });
        cluster.restart(member);
    }
}

#[test]
fn without_quorum_joins_fail_fast_naming_quorum_reads_still_answer_and_writes_resume() {
    let Some((mut cluster, settings)) = three_members() else {
        return;
    };
    let rt = runtime();
    let (s, secret, before) = rt.block_on(async {
        let s = stores(&settings, 2).await;
        let secret = token(&s[0], 100).await;
        let before = s[0].join(txn(Some(&secret), "before", 1)).await.unwrap();
        s[1].wait(before.rev - 1).await.unwrap();
        (s, secret, before)
    });
    let healthy = rt.block_on(s[0].cluster());
    assert_eq!(healthy.members.len(), 3, "{healthy:?}");
    assert!(
        healthy.writable && healthy.health.iter().all(|h| h.healthy),
        "{healthy:?}"
    );
    cluster.kill_quorum();
    rt.block_on(async {
        let doc = s[1].cluster().await;
        assert!(!doc.writable, "{doc:?}");
        assert!(
            doc.reason.as_deref().is_some_and(|r| r.contains("quorum")),
            "{doc:?}"
        );
        assert!(
            doc.health.iter().filter(|h| h.error.is_some()).count() >= 2,
            "{doc:?}"
        );
        let started = Instant::now();
        let refused = s[0]
            .join(txn(Some(&secret), "during", 2))
            .await
            .err()
            .unwrap();
        let took = started.elapsed();
        println!("quorum lost: a join failed after {took:?}: {refused}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert!(refused.retry(), "{refused:?}");
        assert!(refused.to_string().contains("quorum"), "{refused}");
        // Reads come from the mirror.
        let (head, state) = s[1].snapshot().await.unwrap();
        assert!(head >= before.rev && state.records.len() == 1);
        assert!(
            s[1].changes_since(before.rev - 1)
                .await
                .unwrap()
                .unwrap()
                .len()
                == 1
        );
        assert_eq!(s[1].sessions().await.unwrap().len(), 1);
    });
    cluster.restore_quorum();
    rt.block_on(async {
        // No reopening: the same stores write again once etcd has a leader.
        let started = Instant::now();
        let joined = loop {
            match s[0].join(txn(Some(&secret), "after", 3)).await {
                Ok(joined) => break joined,
                Err(e) if e.retry() && started.elapsed() < Duration::from_secs(20) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no recovery: {e}"),
            }
        };
        println!(
            "quorum restored: writes succeeded again after {:?}",
            started.elapsed()
        );
        tokio::time::timeout(Duration::from_secs(10), s[1].wait(joined.rev - 1))
            .await
            .expect("the other gateway's watch did not resume")
            .unwrap();
        // The refused join may still have been committed once quorum came back (its answer
        // was a timeout): its retry gets that node, never a second one.
        let retried = s[1].join(txn(Some(&secret), "during", 2)).await.unwrap();
        let names: Vec<String> = s[1]
            .nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.contains(&"during".to_owned()) && names.contains(&"after".to_owned()));
        assert_eq!(retried.record.name, "during");
    });
}

#[test]
fn presence_appears_and_disappears_when_a_gateway_stops_or_dies() {
    let Some((_cluster, settings)) = three_members() else {
        return;
    };
    runtime().block_on(async {
        let s = stores(&settings, 2).await;
        let mut changes = s[1].presence_changes();
        let presence = |id: u64| GatewayPresence {
            node_id: NodeId(id),
            name: format!("gw{id}"),
            url: format!("https://gw{id}.example:8443"),
            started_at: NOW,
            version: "test".to_owned(),
        };
        let one = s[0].register_presence(presence(1)).await.unwrap();
        let two = s[1].register_presence(presence(2)).await.unwrap();
        let both = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if s[1].gateways_alive().len() == 2 {
                    return s[1].gateways_alive();
                }
                changes.changed().await.unwrap();
            }
        })
        .await
        .unwrap();
        assert_eq!(both, vec![presence(1), presence(2)]);
        // Alive past its TTL: kept alive.
        tokio::time::sleep(Duration::from_secs(PRESENCE_TTL_S as u64 + 2)).await;
        assert_eq!(s[0].gateways_alive().len(), 2);
        // A clean stop goes at once.
        drop(two);
        tokio::time::timeout(Duration::from_secs(2), async {
            while s[0].gateways_alive().len() != 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a released presence stayed");
        // A gateway that dies (no revoke) is gone within TTL + 2 s.
        let died = Instant::now();
        one.abandon();
        tokio::time::timeout(Duration::from_secs(PRESENCE_TTL_S as u64 + 2), async {
            while !s[1].gateways_alive().is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a dead gateway's presence outlived its lease");
        println!(
            "a dead gateway's presence expired after {:?}",
            died.elapsed()
        );
    });
}

/// The etcd store decides joins exactly as sqlite does: the same sequence of joins (retries,
/// renames, spent and expired tokens, requested addresses, revoked keys) gets the same
/// answers, ids and addresses from both.
#[test]
fn joins_get_the_same_answers_from_etcd_as_from_sqlite() {
    let Some((_cluster, settings)) = three_members() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let etcd = stores(&settings, 1).await.remove(0);
        let sqlite = SqliteStore::create(&dir.path().join("store.sqlite"), 42).unwrap();
        let secret = token(&etcd, 3).await;
        token(&sqlite, 3).await;
        let wrong = Secret32([1; 32]);
        type Step = (Option<u8>, &'static str, u32, Option<&'static str>, u64);
        // (token: None | Some(0 right, 1 wrong), name, key, requested address, time offset)
        let steps: [Step; 14] = [
            (None, "gw", 100, Some("10.100.0.1"), 0),
            (Some(0), "a", 1, None, 0),
            (Some(0), "a", 1, None, 10),
            (Some(0), "a", 2, None, 10),
            (Some(1), "b", 3, None, 0),
            (Some(0), "b", 1, None, 0),
            (Some(0), "b", 3, Some("10.100.0.2"), 0),
            (Some(0), "b", 3, Some("10.100.255.255"), 0),
            (Some(0), "b", 3, Some("10.100.0.9"), 0),
            (Some(0), "c", 4, None, 0),
            (Some(0), "c", 4, None, 20),
            (None, "gw-renamed", 100, None, 0),
            (Some(0), "a", 1, None, 700),
            (Some(0), "d", 5, None, 4000),
        ];
        for (i, (tok, name, n, address, offset)) in steps.into_iter().enumerate() {
            let make = || {
                let mut t = txn(tok.map(|w| if w == 0 { &secret } else { &wrong }), name, n);
                t.now = NOW + offset;
                t.reserved = vec![];
                t.requested_address = address.map(|a| a.parse().unwrap());
                t
            };
            let from_etcd = etcd.join(make()).await;
            let from_sqlite = sqlite.join(make()).await;
            let show = |r: &Result<clawnode::gateway::store::Joined, JoinError>| match r {
                Ok(j) => format!(
                    "ok {} {} {:?} serial {}",
                    j.record.node_id, j.record.name, j.record.addresses, j.record.serial
                ),
                Err(e) => format!("refused: {e}"),
            };
            assert_eq!(show(&from_etcd), show(&from_sqlite), "step {i}: {name}");
        }
        let strip = |rows: Vec<clawnode::gateway::store::NodeRow>| {
            rows.into_iter()
                .map(|r| (r.node_id, r.name, r.address, r.revoked, r.serial))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(etcd.nodes().await.unwrap()),
            strip(sqlite.nodes().await.unwrap())
        );
        assert_eq!(
            etcd.sessions().await.unwrap(),
            sqlite.sessions().await.unwrap()
        );
    });
}

#[test]
fn compaction_goes_on_with_more_expired_tokens_than_one_etcd_transaction_takes() {
    let Some((cluster, settings)) = three_members() else {
        return;
    };
    runtime().block_on(async {
        let s = stores(&settings, 1).await;
        // 150 single-use tokens that ran out: more than etcd's --max-txn-ops (128).
        for n in 0..150 {
            s[0].create_token(NewToken {
                id: format!("{n:016x}"),
                hash: [2; 32],
                expires_at: NOW - 10,
                uses: 1,
                now: NOW - 3600,
            })
            .await
            .unwrap();
        }
        assert!(s[0].compact_with(NOW, 1, 0).await.unwrap() > 0);
        let left = cluster.etcdctl(&["get", "--prefix", "--keys-only", "/clawbernetes/tokens/"]);
        let left = String::from_utf8_lossy(&left.stdout);
        assert!(left.trim().is_empty(), "tokens left: {left}");
    });
}

#[test]
fn gateways_opened_before_and_after_a_write_that_is_no_change_hand_out_the_same_cursor() {
    let Some((_cluster, settings)) = three_members() else {
        return;
    };
    runtime().block_on(async {
        let s = stores(&settings, 1).await;
        let before = s[0].snapshot().await.unwrap().0;
        // A token (or a session, or a gateway's presence) moves etcd's revision, not the
        // mesh: a node's cursor from a gateway opened after it must be current on this one.
        token_with_id(&s[0], "00000000000000aa").await;
        let later = EtcdStore::open(&settings).await.unwrap();
        assert_eq!(later.snapshot().await.unwrap().0, before);
        assert_eq!(s[0].snapshot().await.unwrap().0, before);
    });
}
