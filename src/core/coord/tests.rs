//! The coordination rules, as a node sees them.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::core::peer_diff::PeerKey;

const DAY: u64 = 24 * 3600;
const NOW: u64 = 1_800_000_000;

fn seed_key(n: u8) -> zeroize::Zeroizing<Vec<u8>> {
    ed25519_pkcs8_from_seed(&[n; 32])
}

fn root_pkcs8() -> zeroize::Zeroizing<Vec<u8>> {
    seed_key(1)
}

fn signer_pkcs8() -> zeroize::Zeroizing<Vec<u8>> {
    seed_key(2)
}

fn root() -> RootKey {
    RootKey::from_pkcs8(&root_pkcs8()).unwrap()
}

fn cert_for(pkcs8: &[u8], name: &str) -> SignerCert {
    let key = public_key_of_pkcs8(pkcs8).unwrap();
    sign_signer(key, name, 1, NOW + 3650 * DAY, &root_pkcs8()).unwrap()
}

fn cert() -> SignerCert {
    cert_for(&signer_pkcs8(), "gw-1")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn fields(id: u64, key: u8, address: &str, serial: u64) -> RecordFields {
    RecordFields {
        node_id: NodeId(id),
        name: format!("gpu-{id:02}"),
        wg_key: PeerKey([key; 32]),
        addresses: vec![ip(address)],
        roles: vec![Role::Node],
        serial,
        not_after: NOW + 30 * DAY,
        gateway_url: None,
    }
}

fn record(id: u64, key: u8, address: &str, serial: u64) -> NodeRecord {
    sign_record(fields(id, key, address, serial), &signer_pkcs8()).unwrap()
}

fn advert(id: u64, seq: u64, port: u16) -> Advert {
    Advert {
        node_id: NodeId(id),
        seq,
        endpoints: vec![SocketAddr::new(ip("198.51.100.7"), port)],
        services: vec![AdvertService {
            name: "molt-provider".into(),
            port: 8443,
        }],
        gpus: Some(GpuSummary {
            count: 8,
            model: "NVIDIA H200".into(),
            memory_mib: 143_771,
        }),
    }
}

fn update(kind: UpdateKind, rev: u64) -> Update {
    Update {
        cursor: Cursor {
            store_id: 0xab,
            rev,
        },
        kind,
        signers: vec![cert()],
        records: Vec::new(),
        revocations: Vec::new(),
        adverts: Vec::new(),
        gateways: vec!["https://203.0.113.1".into()],
    }
}

fn snapshot(records: Vec<NodeRecord>) -> Update {
    Update {
        records,
        ..update(UpdateKind::Snapshot, 1)
    }
}

fn delta(records: Vec<NodeRecord>) -> Update {
    Update {
        records,
        ..update(UpdateKind::Delta, 2)
    }
}

fn ids(peers: &[GatewayPeer]) -> Vec<u64> {
    peers.iter().map(|p| p.node_id.0).collect()
}

fn live(set: &PeerSet) -> Vec<u64> {
    ids(&set.peers(NOW, Grace::Live))
}

// ---- encoding and signatures ----

fn hex(bytes: &[u8]) -> String {
    super::ids::hex(bytes)
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn the_pkcs8_wrapper_gives_the_rfc8032_key_and_signature() {
    // RFC 8032, 7.1, TEST 1 (empty message).
    let seed: [u8; 32] = unhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
        .try_into()
        .unwrap();
    let pkcs8 = ed25519_pkcs8_from_seed(&seed);
    let public = public_key_of_pkcs8(&pkcs8).unwrap();
    assert_eq!(
        hex(&public),
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    );
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).unwrap();
    assert_eq!(
        hex(pair.sign(b"").as_ref()),
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    );
    assert_eq!(public_key_of_pkcs8(b"not a key"), Err(SignError::BadKey));
    let failure = crate::core::Failure::from(SignError::BadKey);
    assert_eq!(failure.retry(), crate::core::Retry::NeedsOperator);
}

#[test]
fn a_record_is_signed_over_the_documented_byte_layout() {
    let r = sign_record(
        RecordFields {
            node_id: NodeId(0x0102),
            name: "gpu-01".into(),
            wg_key: PeerKey([0xaa; 32]),
            addresses: vec![ip("10.100.0.2"), ip("fd00::2")],
            roles: vec![Role::Node, Role::Gateway],
            serial: 3,
            not_after: 0x0000_0001_0000_0000,
            gateway_url: None,
        },
        &signer_pkcs8(),
    )
    .unwrap();
    let expected = [
        hex(b"clawnode-node-record-v1\0"),
        "0000000000000102".into(),      // node id
        "0006".into(),                  // name length
        hex(b"gpu-01"),                 //
        "aa".repeat(32),                // WireGuard key
        "0002".into(),                  // two addresses
        "04 0a640002".replace(' ', ""), // IPv4
        "06 fd000000000000000000000000000002".replace(' ', ""),
        "0002 00 01".replace(' ', ""), // roles node, gateway
        "0000000000000003".into(),     // serial
        "0000000100000000".into(),     // not_after
        hex(&r.signer.0),              // signer key id
    ]
    .concat();
    assert_eq!(hex(&r.signed_bytes().unwrap()), expected);
    assert_eq!(
        r.signer,
        KeyId::of(&public_key_of_pkcs8(&signer_pkcs8()).unwrap())
    );
    // The signer key id is SHA-256 of the raw key, first 8 bytes.
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        &public_key_of_pkcs8(&signer_pkcs8()).unwrap(),
    );
    assert_eq!(r.signer.0, digest.as_ref()[..8]);
    // Ed25519 is deterministic: the same key and bytes give this signature, here and in any
    // other implementation of the format.
    assert_eq!(
        b64::url_encode(&r.sig),
        b64::url_encode(
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&signer_pkcs8())
                .unwrap()
                .sign(&unhex(&expected))
                .as_ref()
        )
    );
    r.verify(&cert()).unwrap();
}

#[test]
fn signer_certs_and_revocations_are_signed_over_the_documented_byte_layout() {
    let c = cert();
    let expected = [
        hex(b"clawnode-signer-v1\0"),
        hex(&c.key),
        hex(&c.key_id.0),
        "0004".into(),
        hex(b"gw-1"),
        "0000000000000001".into(),
        hex(&(NOW + 3650 * DAY).to_be_bytes()),
    ]
    .concat();
    assert_eq!(hex(&c.signed_bytes().unwrap()), expected);
    c.verify(&root()).unwrap();

    let rev = sign_revocation(NodeId(7), 9, &signer_pkcs8()).unwrap();
    let expected = [
        hex(b"clawnode-revocation-v1\0"),
        "0000000000000007".into(),
        "0000000000000009".into(),
        hex(&c.key_id.0),
    ]
    .concat();
    assert_eq!(hex(&rev.signed_bytes()), expected);
    rev.verify(&c).unwrap();
}

#[test]
fn a_fixed_key_and_record_give_a_fixed_signature() {
    // A regression vector: a change to the encoding changes this and breaks every cache and
    // store in the field, so it must be a deliberate version bump (a new domain tag).
    let r = record(3, 0x33, "10.100.0.3", 1);
    assert_eq!(r.signer.to_string(), KEY_ID_OF_SEED_2);
    assert_eq!(b64::url_encode(&r.sig), SIG_OF_RECORD_3);
}

fn gateway_fields(url: &str) -> RecordFields {
    RecordFields {
        roles: vec![Role::Node, Role::Gateway],
        gateway_url: Some(url.into()),
        ..fields(3, 0x33, "10.100.0.3", 1)
    }
}

#[test]
fn a_gateway_url_is_signed_after_the_signer_only_when_present() {
    let plain = record(3, 0x33, "10.100.0.3", 1);
    let mut f = fields(3, 0x33, "10.100.0.3", 1);
    f.roles = vec![Role::Node, Role::Gateway];
    let no_url = sign_record(f, &signer_pkcs8()).unwrap();
    let gw = sign_record(gateway_fields("https://gw1.example:8443"), &signer_pkcs8()).unwrap();
    let without = hex(&no_url.signed_bytes().unwrap());
    assert_eq!(
        hex(&gw.signed_bytes().unwrap()),
        [without, "0018".into(), hex(b"https://gw1.example:8443")].concat()
    );
    // A regression vector for a record with the URL (see the one below without it).
    assert_eq!(b64::url_encode(&gw.sig), SIG_OF_GATEWAY_RECORD_3);
    gw.verify(&cert()).unwrap();
    plain.verify(&cert()).unwrap();

    // The URL cannot be changed, added or stripped without the signer.
    let mut moved = gw.clone();
    moved.gateway_url = Some("https://evil.example".into());
    assert_eq!(moved.verify(&cert()), Err(Invalid::BadSignature));
    let mut stripped = gw.clone();
    stripped.gateway_url = None;
    assert_eq!(stripped.verify(&cert()), Err(Invalid::BadSignature));
    let mut added = no_url.clone();
    added.gateway_url = Some("https://gw1.example:8443".into());
    assert_eq!(added.verify(&cert()), Err(Invalid::BadSignature));

    // JSON: absent without a URL (records and caches read as before), a string with one.
    let json = serde_json::to_value(&plain).unwrap();
    assert!(json.get("gateway_url").is_none(), "{json}");
    let json = serde_json::to_value(&gw).unwrap();
    assert_eq!(json["gateway_url"], "https://gw1.example:8443");
    assert_eq!(serde_json::from_value::<NodeRecord>(json).unwrap(), gw);
}

const SIG_OF_GATEWAY_RECORD_3: &str =
    "WAVFjDCdgPbdY4bBIPkMhzC2Dox81Fe3IT81WshkoxvQHJnAgCBHMbzlxdguaewdLL9T3Jd6gU_BcZWWQHy0BQ";

#[test]
fn only_a_gateway_record_carries_a_gateway_url_and_only_an_https_one() {
    let mut on_a_node = gateway_fields("https://gw1.example");
    on_a_node.roles = vec![Role::Node];
    for f in [
        on_a_node,
        gateway_fields("http://gw1.example"),
        gateway_fields("https://gw1.example/v1"),
        gateway_fields(&format!("https://{}.example", "a".repeat(300))),
    ] {
        assert!(
            matches!(
                sign_record(f.clone(), &signer_pkcs8()),
                Err(SignError::Malformed(_))
            ),
            "{f:?}"
        );
    }
    assert!(sign_record(gateway_fields("https://[2001:db8::1]:443"), &signer_pkcs8()).is_ok());
}

const KEY_ID_OF_SEED_2: &str = "6a3803d5f059902a";
const SIG_OF_RECORD_3: &str =
    "tE6NOk9CdXdbvHjYdxG4y9ahM23SgQFI7YRcg4si8qBslr2F7x8vYKKa8rZKaeLChAlUFg9Azco5J_4KN4ohAw";

#[test]
fn records_certs_and_revocations_read_and_write_json_in_the_documented_forms() {
    let r = record(3, 0x33, "10.100.0.3", 1);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["node_id"], "n3");
    assert_eq!(
        json["wg_key"],
        "MzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzM="
    );
    assert_eq!(json["signer"], r.signer.to_string());
    assert_eq!(
        json["sig"].as_str().unwrap().len(),
        86,
        "unpadded base64url"
    );
    assert_eq!(json["roles"], serde_json::json!(["node"]));
    let back: NodeRecord = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, r);

    let mut extra = json.clone();
    extra["trusted"] = true.into();
    assert!(serde_json::from_value::<NodeRecord>(extra).is_err());
    let mut padded = json.clone();
    padded["sig"] = format!("{}==", json["sig"].as_str().unwrap()).into();
    assert!(serde_json::from_value::<NodeRecord>(padded).is_err());
    let mut bad_id = json;
    bad_id["node_id"] = "n03".into();
    assert!(serde_json::from_value::<NodeRecord>(bad_id).is_err());

    let c = cert();
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["key_id"].as_str().unwrap().len(), 16);
    assert_eq!(serde_json::from_value::<SignerCert>(json).unwrap(), c);
    let rev = sign_revocation(NodeId(7), 9, &signer_pkcs8()).unwrap();
    let text = serde_json::to_string(&rev).unwrap();
    assert_eq!(serde_json::from_str::<Revocation>(&text).unwrap(), rev);
}

#[test]
fn a_tampered_record_cert_or_revocation_does_not_verify() {
    let c = cert();
    let r = record(3, 0x33, "10.100.0.3", 1);
    let mut moved = r.clone();
    moved.addresses = vec![ip("10.100.0.4")];
    assert_eq!(moved.verify(&c), Err(Invalid::BadSignature));
    let mut flipped = r.clone();
    flipped.sig[10] ^= 1;
    assert_eq!(flipped.verify(&c), Err(Invalid::BadSignature));
    let mut later = r.clone();
    later.not_after += 1;
    assert_eq!(later.verify(&c), Err(Invalid::BadSignature));
    let mut unsigned = r.clone();
    unsigned.sig = [0; 64];
    assert_eq!(unsigned.verify(&c), Err(Invalid::BadSignature));

    let mut forged = c.clone();
    forged.not_after += 1;
    assert_eq!(forged.verify(&root()), Err(Invalid::BadSignature));
    let mut relabelled = c.clone();
    relabelled.key_id = KeyId([0; 8]);
    assert!(matches!(
        relabelled.verify(&root()),
        Err(Invalid::KeyIdMismatch(_))
    ));
    // A cert the signer made for itself is not one the root made.
    let self_signed = sign_signer(c.key, "gw-1", 1, c.not_after, &signer_pkcs8()).unwrap();
    assert_eq!(self_signed.verify(&root()), Err(Invalid::BadSignature));

    let mut rev = sign_revocation(NodeId(7), 9, &signer_pkcs8()).unwrap();
    rev.serial = 10;
    assert_eq!(rev.verify(&c), Err(Invalid::BadSignature));
    // A record verified with the wrong signer's cert names the signer it lacks.
    let other = cert_for(&seed_key(3), "gw-2");
    assert_eq!(r.verify(&other), Err(Invalid::UnknownSigner(r.signer)));
}

#[test]
fn records_that_cannot_be_a_peer_are_not_signed() {
    let mut f = fields(3, 0x33, "10.100.0.3", 1);
    f.name = "Gpu_3".into();
    assert!(sign_record(f, &signer_pkcs8()).is_err());
    let mut f = fields(3, 0x33, "10.100.0.3", 1);
    f.addresses.clear();
    assert!(sign_record(f, &signer_pkcs8()).is_err());
    let mut f = fields(3, 0x33, "10.100.0.3", 1);
    f.addresses.push(ip("10.100.0.3"));
    assert!(sign_record(f, &signer_pkcs8()).is_err());
    let mut f = fields(3, 0x33, "10.100.0.3", 1);
    f.roles = vec![Role::Node, Role::Node];
    assert!(sign_record(f, &signer_pkcs8()).is_err());
    assert_eq!(
        sign_record(fields(3, 0x33, "10.100.0.3", 1), b"junk"),
        Err(SignError::BadKey)
    );
}

// ---- PeerSet ----

#[test]
fn a_verified_snapshot_gives_its_peers_with_their_adverts() {
    let mut set = PeerSet::new(root());
    let mut up = snapshot(vec![
        record(3, 0x33, "10.100.0.3", 1),
        record(4, 0x44, "10.100.0.4", 1),
    ]);
    up.adverts = vec![advert(3, 1, 51820)];
    let applied = set.apply(&up, NOW);
    assert_eq!(applied.rejected, vec![]);
    assert_eq!(applied.added, vec![NodeId(3), NodeId(4)]);
    let peers = set.peers(NOW, Grace::Live);
    assert_eq!(ids(&peers), vec![3, 4]);
    assert_eq!(peers[0].name, "gpu-03");
    assert_eq!(peers[0].key, PeerKey([0x33; 32]));
    assert_eq!(peers[0].addresses, vec![ip("10.100.0.3")]);
    assert_eq!(
        peers[0].endpoint,
        Some("198.51.100.7:51820".parse().unwrap())
    );
    assert_eq!(peers[0].services[0].name, "molt-provider");
    assert_eq!(peers[0].roles, vec![Role::Node]);
    assert_eq!(peers[1].endpoint, None);
    assert_eq!(
        peers[0].allowed_ips(),
        vec!["10.100.0.3/32".parse().unwrap()]
    );
}

#[test]
fn an_unsigned_or_tampered_record_is_not_a_peer() {
    let mut set = PeerSet::new(root());
    let mut tampered = record(4, 0x44, "10.100.0.4", 1);
    tampered.wg_key = PeerKey([0x66; 32]);
    let mut unsigned = record(5, 0x55, "10.100.0.5", 1);
    unsigned.sig = [0; 64];
    let applied = set.apply(
        &snapshot(vec![record(3, 0x33, "10.100.0.3", 1), tampered, unsigned]),
        NOW,
    );
    assert_eq!(live(&set), vec![3]);
    assert_eq!(applied.rejected.len(), 2);
    assert!(
        applied
            .rejected
            .iter()
            .all(|(_, r)| *r == Reject::Invalid(Invalid::BadSignature)),
        "{:?}",
        applied.rejected
    );
    assert!(
        applied.rejected[0].0.contains("n4"),
        "{:?}",
        applied.rejected
    );
}

#[test]
fn a_record_from_a_signer_the_root_did_not_authorise_is_not_a_peer() {
    let mut set = PeerSet::new(root());
    // Signed by a key with no cert at all.
    let rogue = sign_record(fields(3, 0x33, "10.100.0.3", 1), &seed_key(9)).unwrap();
    // Signed by a key whose cert the root did not sign.
    let key = public_key_of_pkcs8(&seed_key(8)).unwrap();
    let fake_cert = sign_signer(key, "gw-x", 1, NOW + DAY, &seed_key(8)).unwrap();
    let by_fake = sign_record(fields(4, 0x44, "10.100.0.4", 1), &seed_key(8)).unwrap();
    let mut up = snapshot(vec![rogue.clone(), by_fake]);
    up.signers.push(fake_cert);
    let applied = set.apply(&up, NOW);
    assert_eq!(live(&set), Vec::<u64>::new());
    let reasons: Vec<_> = applied.rejected.iter().map(|(_, r)| r.clone()).collect();
    assert!(reasons.contains(&Reject::Invalid(Invalid::BadSignature)));
    assert!(reasons.contains(&Reject::Invalid(Invalid::UnknownSigner(rogue.signer))));
    assert_eq!(reasons.len(), 3, "the cert and both records: {reasons:?}");
}

#[test]
fn a_peer_set_lists_the_urls_of_its_live_unrevoked_gateway_records() {
    let mut set = PeerSet::new(root());
    let mut gw2 = gateway_fields("https://gw2.example");
    gw2.node_id = NodeId(2);
    gw2.name = "gw-2".into();
    gw2.wg_key = PeerKey([0x22; 32]);
    gw2.addresses = vec![ip("10.100.0.2")];
    let mut old = gateway_fields("https://gw5.example");
    old.node_id = NodeId(5);
    old.wg_key = PeerKey([0x55; 32]);
    old.addresses = vec![ip("10.100.0.5")];
    old.not_after = NOW - 1;
    set.apply(
        &snapshot(vec![
            sign_record(gw2, &signer_pkcs8()).unwrap(),
            sign_record(gateway_fields("https://gw3.example"), &signer_pkcs8()).unwrap(),
            record(4, 0x44, "10.100.0.4", 1),
            sign_record(old, &signer_pkcs8()).unwrap(),
        ]),
        NOW - 10,
    );
    assert_eq!(
        set.gateway_urls(NOW, Grace::Live),
        ["https://gw2.example", "https://gw3.example"]
    );
    let mut up = update(UpdateKind::Delta, 2);
    up.revocations = vec![sign_revocation(NodeId(2), 1, &signer_pkcs8()).unwrap()];
    set.apply(&up, NOW);
    assert_eq!(set.gateway_urls(NOW, Grace::Live), ["https://gw3.example"]);
}

#[test]
fn a_revoked_signers_records_are_dropped_at_once_even_offline_and_never_come_back() {
    let mut set = PeerSet::new(root());
    let gw2_key = public_key_of_pkcs8(&seed_key(3)).unwrap();
    let gw2 = sign_signer(gw2_key, "gw-2", 1, NOW + 3650 * DAY, &root_pkcs8()).unwrap();
    let by_gw2 = sign_record(fields(4, 0x44, "10.100.0.4", 1), &seed_key(3)).unwrap();
    let mut up = snapshot(vec![record(3, 0x33, "10.100.0.3", 1), by_gw2.clone()]);
    up.signers.push(gw2.clone());
    set.apply(&up, NOW);
    assert_eq!(live(&set), vec![3, 4]);

    // `gateway signer revoke`: the same key re-issued with serial 2, already expired.
    let revoked = sign_signer(gw2_key, "gw-2", 2, NOW - 1, &root_pkcs8()).unwrap();
    let mut up = update(UpdateKind::Delta, 2);
    up.signers = vec![revoked.clone()];
    let applied = set.apply(&up, NOW);
    assert_eq!(applied.removed, vec![NodeId(4)]);
    assert_eq!(applied.rejected, vec![]);
    let offline = Grace::Offline {
        since: NOW,
        grace: DEFAULT_OFFLINE_GRACE_S,
    };
    assert_eq!(ids(&set.peers(NOW + 1, offline)), vec![3]);

    // The old, still valid cert (a stale gateway) does not authorise the key again, nor
    // does a record it signed, from a gateway or from the cache.
    let mut stale = delta(vec![by_gw2.clone()]);
    stale.signers = vec![gw2.clone()];
    let applied = set.apply(&stale, NOW + 2);
    assert_eq!(
        applied.rejected[0].1,
        Reject::SignerExpired(gw2.key_id),
        "{applied:?}"
    );
    assert_eq!(live(&set), vec![3]);
    let mut cache = set.to_cache(
        Cursor {
            store_id: 0xab,
            rev: 3,
        },
        NOW,
    );
    assert_eq!(
        cache.signers.iter().find(|c| c.key_id == gw2.key_id),
        Some(&revoked)
    );
    cache.records.push(by_gw2);
    let (loaded, _) = PeerSet::from_cache(root(), &cache).unwrap();
    let mut again = loaded.clone();
    again.apply(&up, NOW + 3);
    assert_eq!(ids(&again.peers(NOW + 3, offline)), vec![3]);
}

#[test]
fn records_of_a_signer_whose_cert_expired_are_refused_from_a_gateway() {
    let mut set = PeerSet::new(root());
    let key = public_key_of_pkcs8(&seed_key(3)).unwrap();
    let old = sign_signer(key, "gw-2", 1, NOW - 1, &root_pkcs8()).unwrap();
    let mut up = snapshot(vec![
        sign_record(fields(3, 0x33, "10.100.0.3", 1), &seed_key(3)).unwrap(),
    ]);
    up.signers = vec![old.clone()];
    let applied = set.apply(&up, NOW);
    assert_eq!(applied.rejected[0].1, Reject::SignerExpired(old.key_id));
    assert_eq!(live(&set), Vec::<u64>::new());
}

#[test]
fn a_revoked_node_never_comes_back_from_a_later_snapshot_delta_or_cache() {
    let mut set = PeerSet::new(root());
    let r3 = record(3, 0x33, "10.100.0.3", 1);
    let r3b = record(3, 0x33, "10.100.0.3", 2);
    set.apply(
        &snapshot(vec![r3.clone(), record(4, 0x44, "10.100.0.4", 1)]),
        NOW,
    );
    let mut up = update(UpdateKind::Delta, 2);
    up.records = vec![r3b.clone()];
    set.apply(&up, NOW);
    let mut revoke = update(UpdateKind::Delta, 3);
    revoke.revocations = vec![sign_revocation(NodeId(3), 2, &signer_pkcs8()).unwrap()];
    let applied = set.apply(&revoke, NOW);
    assert_eq!(applied.removed, vec![NodeId(3)]);
    assert_eq!(live(&set), vec![4]);

    // An old snapshot (a gateway restored from backup, a replay) brings both serials back.
    let applied = set.apply(
        &snapshot(vec![
            r3.clone(),
            r3b.clone(),
            record(4, 0x44, "10.100.0.4", 1),
        ]),
        NOW,
    );
    assert_eq!(live(&set), vec![4]);
    assert!(
        applied
            .rejected
            .iter()
            .all(|(_, r)| matches!(r, Reject::Revoked { .. }))
    );
    assert_eq!(applied.rejected.len(), 2);
    set.apply(&delta(vec![r3b.clone()]), NOW);
    assert_eq!(live(&set), vec![4]);

    // A cache with the revocation and the record (written by hand, or by a bug) stays clean.
    let mut cache = set.to_cache(
        Cursor {
            store_id: 0xab,
            rev: 3,
        },
        NOW,
    );
    cache.records.push(r3b.clone());
    let (loaded, rejected) = PeerSet::from_cache(root(), &cache).unwrap();
    assert_eq!(live(&loaded), vec![4]);
    assert_eq!(
        rejected,
        vec![Reject::Revoked {
            node_id: NodeId(3),
            serial: 2
        }]
    );
    assert!(
        loaded.to_cache(cache.cursor, NOW).revocations.len() == 1,
        "the revocation is kept forever"
    );
    // A revocation arriving with the record in one delta wins, whatever the order.
    let mut fresh = PeerSet::new(root());
    let mut both = update(UpdateKind::Delta, 2);
    both.records = vec![r3.clone()];
    both.revocations = revoke.revocations.clone();
    fresh.apply(&both, NOW);
    assert_eq!(live(&fresh), Vec::<u64>::new());
}

#[test]
fn a_revocation_from_an_unknown_signer_is_ignored() {
    let mut set = PeerSet::new(root());
    set.apply(&snapshot(vec![record(3, 0x33, "10.100.0.3", 1)]), NOW);
    let mut up = update(UpdateKind::Delta, 2);
    up.revocations = vec![sign_revocation(NodeId(3), 5, &seed_key(9)).unwrap()];
    let applied = set.apply(&up, NOW);
    assert_eq!(live(&set), vec![3]);
    assert!(matches!(
        applied.rejected[0].1,
        Reject::Invalid(Invalid::UnknownSigner(_))
    ));
}

#[test]
fn an_address_pinned_to_one_node_is_refused_to_another_even_after_revocation() {
    let mut set = PeerSet::new(root());
    set.apply(&snapshot(vec![record(3, 0x33, "10.100.0.3", 1)]), NOW);
    let thief = record(4, 0x44, "10.100.0.3", 1);
    let applied = set.apply(&delta(vec![thief.clone()]), NOW);
    assert_eq!(
        applied.rejected[0].1,
        Reject::AddressPinned {
            address: ip("10.100.0.3"),
            owner: NodeId(3)
        }
    );
    let mut revoke = update(UpdateKind::Delta, 3);
    revoke.revocations = vec![sign_revocation(NodeId(3), 1, &signer_pkcs8()).unwrap()];
    set.apply(&revoke, NOW);
    set.apply(&delta(vec![thief.clone()]), NOW);
    assert_eq!(
        live(&set),
        Vec::<u64>::new(),
        "a revoked node's address stays pinned"
    );
    // ... across a restart from the cache too.
    let cache = set.to_cache(
        Cursor {
            store_id: 1,
            rev: 3,
        },
        NOW,
    );
    let (mut loaded, _) = PeerSet::from_cache(root(), &cache).unwrap();
    let applied = loaded.apply(&snapshot(vec![thief]), NOW);
    assert_eq!(live(&loaded), Vec::<u64>::new());
    assert!(matches!(
        applied.rejected[0].1,
        Reject::AddressPinned { .. }
    ));
}

#[test]
fn a_node_changes_its_key_only_with_a_higher_serial() {
    let mut set = PeerSet::new(root());
    set.apply(&snapshot(vec![record(3, 0x33, "10.100.0.3", 2)]), NOW);
    let same_serial = record(3, 0x99, "10.100.0.3", 2);
    let applied = set.apply(&delta(vec![same_serial.clone()]), NOW);
    assert!(matches!(applied.rejected[0].1, Reject::StaleSerial { .. }));
    // Not through a snapshot that leaves the node out first, either.
    set.apply(&snapshot(vec![]), NOW);
    let applied = set.apply(&snapshot(vec![same_serial]), NOW);
    assert_eq!(
        applied.rejected[0].1,
        Reject::KeyPinned {
            node_id: NodeId(3),
            serial: 2
        }
    );
    assert_eq!(live(&set), Vec::<u64>::new());
    let rekeyed = record(3, 0x99, "10.100.0.3", 3);
    let applied = set.apply(&delta(vec![rekeyed]), NOW);
    assert_eq!(applied.rejected, vec![]);
    assert_eq!(set.peers(NOW, Grace::Live)[0].key, PeerKey([0x99; 32]));
}

#[test]
fn two_nodes_never_share_a_wireguard_key() {
    let mut set = PeerSet::new(root());
    set.apply(&snapshot(vec![record(3, 0x33, "10.100.0.3", 1)]), NOW);
    let applied = set.apply(&delta(vec![record(4, 0x33, "10.100.0.4", 1)]), NOW);
    assert_eq!(
        applied.rejected[0].1,
        Reject::KeyInUse {
            node_id: NodeId(4),
            owner: NodeId(3)
        }
    );
    assert_eq!(live(&set), vec![3]);
}

#[test]
fn an_older_record_does_not_replace_a_newer_one() {
    let mut set = PeerSet::new(root());
    let newer = record(3, 0x33, "10.100.0.3", 5);
    set.apply(&snapshot(vec![newer.clone()]), NOW);
    let applied = set.apply(&delta(vec![record(3, 0x33, "10.100.0.3", 4)]), NOW);
    assert!(matches!(
        applied.rejected[0].1,
        Reject::StaleSerial { held: 5, .. }
    ));
    // A snapshot with the older one keeps the newer verified one.
    let applied = set.apply(&snapshot(vec![record(3, 0x33, "10.100.0.3", 4)]), NOW);
    assert_eq!(applied.rejected.len(), 1);
    assert_eq!(set.record(NodeId(3)), Some(&newer));
    assert!(!applied.touched());
    // The same record again is no change and no complaint.
    let applied = set.apply(&delta(vec![newer]), NOW);
    assert_eq!(applied, Applied::default());
}

#[test]
fn an_advert_needs_a_known_node_and_a_higher_seq() {
    let mut set = PeerSet::new(root());
    set.apply(&snapshot(vec![record(3, 0x33, "10.100.0.3", 1)]), NOW);
    let mut up = update(UpdateKind::Delta, 2);
    up.adverts = vec![advert(3, 5, 51820), advert(9, 1, 51820)];
    let applied = set.apply(&up, NOW);
    assert_eq!(applied.changed, vec![NodeId(3)]);
    assert_eq!(applied.rejected[0].1, Reject::UnknownNode(NodeId(9)));

    up.adverts = vec![advert(3, 4, 4000)];
    let applied = set.apply(&up, NOW);
    assert_eq!(
        applied.rejected[0].1,
        Reject::StaleSeq {
            node_id: NodeId(3),
            seq: 4,
            held: 5
        }
    );
    up.adverts = vec![advert(3, 5, 4000)];
    assert_eq!(
        set.apply(&up, NOW).rejected.len(),
        1,
        "same seq, other content"
    );
    up.adverts = vec![advert(3, 5, 51820)];
    assert_eq!(
        set.apply(&up, NOW),
        Applied::default(),
        "the same advert again"
    );
    // A snapshot cannot roll it back either.
    let mut snap = snapshot(vec![record(3, 0x33, "10.100.0.3", 1)]);
    snap.adverts = vec![advert(3, 2, 4000)];
    let applied = set.apply(&snap, NOW);
    assert!(matches!(
        applied.rejected[0].1,
        Reject::StaleSeq { held: 5, .. }
    ));
    assert_eq!(
        set.peers(NOW, Grace::Live)[0].endpoint,
        Some("198.51.100.7:51820".parse().unwrap()),
    );
    // A snapshot without the node's advert drops it.
    set.apply(&snapshot(vec![record(3, 0x33, "10.100.0.3", 1)]), NOW);
    assert_eq!(set.peers(NOW, Grace::Live)[0].endpoint, None);
}

#[test]
fn a_snapshot_replaces_records_and_adverts_but_keeps_revocations_and_pins() {
    let mut set = PeerSet::new(root());
    let mut first = snapshot(vec![
        record(3, 0x33, "10.100.0.3", 1),
        record(4, 0x44, "10.100.0.4", 1),
        record(5, 0x55, "10.100.0.5", 1),
    ]);
    first.adverts = vec![advert(3, 1, 51820), advert(4, 1, 51820)];
    first.revocations = vec![sign_revocation(NodeId(5), 1, &signer_pkcs8()).unwrap()];
    set.apply(&first, NOW);
    assert_eq!(live(&set), vec![3, 4]);

    // Node 4 left; node 3's advert is gone; revocations are not repeated.
    let applied = set.apply(
        &snapshot(vec![
            record(3, 0x33, "10.100.0.3", 1),
            record(5, 0x55, "10.100.0.5", 1),
            record(6, 0x66, "10.100.0.4", 1),
        ]),
        NOW,
    );
    assert_eq!(live(&set), vec![3]);
    assert_eq!(applied.removed, vec![NodeId(4)]);
    assert_eq!(applied.changed, vec![NodeId(3)], "its advert went");
    assert!(set.advert(NodeId(3)).is_none());
    let reasons: Vec<_> = applied.rejected.into_iter().map(|(_, r)| r).collect();
    assert_eq!(
        reasons,
        vec![
            Reject::Revoked {
                node_id: NodeId(5),
                serial: 1
            },
            Reject::AddressPinned {
                address: ip("10.100.0.4"),
                owner: NodeId(4)
            },
        ]
    );
}

#[test]
fn expired_records_drop_while_a_gateway_answers_and_stay_for_the_grace_while_none_does() {
    let mut set = PeerSet::new(root());
    let mut f = fields(3, 0x33, "10.100.0.3", 1);
    f.not_after = NOW + 10;
    let expiring = sign_record(f, &signer_pkcs8()).unwrap();
    let mut f = fields(4, 0x44, "10.100.0.4", 1);
    f.not_after = NOW - 10;
    let expired_before_the_outage = sign_record(f, &signer_pkcs8()).unwrap();
    set.apply(
        &snapshot(vec![
            expiring,
            expired_before_the_outage,
            record(5, 0x55, "10.100.0.5", 1),
        ]),
        NOW - 20,
    );

    assert_eq!(ids(&set.peers(NOW + 10, Grace::Live)), vec![3, 5]);
    assert_eq!(ids(&set.peers(NOW + 11, Grace::Live)), vec![5]);
    let offline = Grace::Offline {
        since: NOW,
        grace: DEFAULT_OFFLINE_GRACE_S,
    };
    assert_eq!(ids(&set.peers(NOW + 11, offline)), vec![3, 5]);
    assert_eq!(ids(&set.peers(NOW + 10 + 7 * DAY, offline)), vec![3, 5]);
    assert_eq!(ids(&set.peers(NOW + 11 + 7 * DAY, offline)), vec![5]);
    assert_eq!(
        ids(&set.peers(NOW + 30 * DAY + 7 * DAY + 1, offline)),
        Vec::<u64>::new()
    );
}

#[test]
fn resigning_is_due_with_less_than_fifteen_days_left() {
    assert!(!needs_resign(NOW + 16 * DAY, NOW));
    assert!(!needs_resign(NOW + 15 * DAY, NOW));
    assert!(needs_resign(NOW + 15 * DAY - 1, NOW));
    assert!(needs_resign(NOW - 1, NOW));
}

#[test]
fn the_cache_reloads_to_the_same_peers_and_refuses_another_cluster() {
    let mut set = PeerSet::new(root());
    let mut up = snapshot(vec![
        record(3, 0x33, "10.100.0.3", 1),
        record(4, 0x44, "10.100.0.4", 1),
    ]);
    up.adverts = vec![advert(4, 3, 51820)];
    set.apply(&up, NOW);
    let cursor = Cursor {
        store_id: 0xab,
        rev: 7,
    };
    let cache = set.to_cache(cursor, NOW);
    let text = serde_json::to_string_pretty(&cache).unwrap();
    let read: CacheFile = serde_json::from_str(&text).unwrap();
    let (loaded, rejected) = PeerSet::from_cache(root(), &read).unwrap();
    assert_eq!(rejected, vec![]);
    assert_eq!(loaded, set);
    assert_eq!(read.cursor, cursor);

    let other = RootKey::from_pkcs8(&seed_key(7)).unwrap();
    assert_eq!(
        PeerSet::from_cache(other, &read).unwrap_err(),
        CacheRefused::OtherRoot {
            found: root(),
            expected: other
        }
    );
    // A file that claims the session's root but carries another cluster's certs yields nothing.
    let mut foreign = read.clone();
    foreign.root = other;
    let (loaded, rejected) = PeerSet::from_cache(other, &foreign).unwrap();
    assert_eq!(live(&loaded), Vec::<u64>::new());
    assert!(rejected.contains(&Reject::Invalid(Invalid::BadSignature)));
    let mut newer = read;
    newer.version = 2;
    assert_eq!(
        PeerSet::from_cache(root(), &newer).unwrap_err(),
        CacheRefused::Version(2)
    );
}

#[test]
fn a_tampered_cache_entry_is_left_out() {
    let mut set = PeerSet::new(root());
    set.apply(
        &snapshot(vec![
            record(3, 0x33, "10.100.0.3", 1),
            record(4, 0x44, "10.100.0.4", 1),
        ]),
        NOW,
    );
    let mut cache = set.to_cache(
        Cursor {
            store_id: 1,
            rev: 1,
        },
        NOW,
    );
    cache.records[1].addresses = vec![ip("10.100.0.99")];
    let (loaded, rejected) = PeerSet::from_cache(root(), &cache).unwrap();
    assert_eq!(live(&loaded), vec![3]);
    assert_eq!(rejected, vec![Reject::Invalid(Invalid::BadSignature)]);
    // An entry in JSON it does not know makes the file unreadable (the shell then ignores it).
    let mut value = serde_json::to_value(&cache).unwrap();
    value["records"][0]["extra"] = 1.into();
    assert!(serde_json::from_value::<CacheFile>(value).is_err());
}

#[test]
fn apply_says_what_changed() {
    let mut set = PeerSet::new(root());
    set.apply(
        &snapshot(vec![
            record(3, 0x33, "10.100.0.3", 1),
            record(4, 0x44, "10.100.0.4", 1),
        ]),
        NOW,
    );
    let applied = set.apply(
        &delta(vec![
            record(4, 0x44, "10.100.0.4", 2),
            record(5, 0x55, "10.100.0.5", 1),
        ]),
        NOW,
    );
    assert_eq!(applied.added, vec![NodeId(5)]);
    assert_eq!(applied.changed, vec![NodeId(4)]);
    assert!(applied.removed.is_empty() && applied.touched());
    let applied = set.apply(&update(UpdateKind::Delta, 5), NOW);
    assert!(!applied.touched(), "an empty delta changes nothing");
}

// ---- tokens, sessions, cursors ----

fn token() -> JoinToken {
    JoinToken {
        id: TokenId([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]),
        secret: Secret32([7; 32]),
        root: root(),
        urls: vec![
            "https://203.0.113.1:443".into(),
            "https://[2001:db8::1]:8443".into(),
            "https://gw.example.net".into(),
        ],
    }
}

#[test]
fn a_token_reads_back_as_written() {
    let t = token();
    let text = t.to_string();
    assert!(text.starts_with("cbn1.0123456789abcdef.BwcH"), "{text}");
    assert_eq!(text.split('.').count(), 5);
    assert_eq!(text.parse::<JoinToken>().unwrap(), t);
    assert!(!text.contains('='));
    // The URL part is base64url of the comma-joined URLs.
    let urls = text.rsplit('.').next().unwrap();
    assert_eq!(
        String::from_utf8(b64::url_decode(urls).unwrap()).unwrap(),
        "https://203.0.113.1:443,https://[2001:db8::1]:8443,https://gw.example.net"
    );
    assert_eq!(token_hash(&t.secret), t.secret.hash());
    assert_eq!(
        hex(&token_hash(&t.secret)),
        hex(ring::digest::digest(&ring::digest::SHA256, &[7; 32]).as_ref())
    );
}

#[test]
fn a_token_in_any_other_form_is_refused_without_echoing_the_secret() {
    let good = token().to_string();
    let secret = Secret32([7; 32]).to_b64url().to_string();
    let parts: Vec<&str> = good.split('.').collect();
    let with = |i: usize, v: &str| {
        let mut p = parts.clone();
        p[i] = v;
        p.join(".")
    };
    let urls = |s: &str| b64::url_encode(s.as_bytes());
    let bad = vec![
        String::new(),
        good.replacen("cbn1", "cbn2", 1),
        good.to_uppercase(),
        format!("{good}."),
        format!(" {good}"),
        format!("{good}\n"),
        with(1, "0123456789ABCDEF"),
        with(1, "0123456789abcde"),
        with(1, "+123456789abcdef"),
        with(2, &format!("{secret}=")),
        with(2, &secret[1..]),
        with(2, &format!("+{}", &secret[1..])),
        // Same bytes, non-zero trailing bits: not the canonical spelling.
        with(2, &format!("{}{}", &secret[..42], "x")),
        with(3, "AAAA"),
        with(4, ""),
        with(4, &urls("http://203.0.113.1")),
        with(4, &urls("https://203.0.113.1/path")),
        with(4, &urls("https://203.0.113.1:0")),
        with(4, &urls("https://203.0.113.1:65536")),
        with(4, &urls("https://203.0.113.1:0443")),
        with(4, &urls("https://user@203.0.113.1")),
        with(4, &urls("https://[2001:db8::1")),
        with(4, &urls("https://203.0.113.1,")),
        with(4, &urls("https://a b")),
        with(4, &urls("https://gw.example.net\u{1b}[2J")),
        with(4, &format!("{}=", urls("https://203.0.113.1"))),
        format!("{good}{}", "A".repeat(5000)),
    ];
    for text in bad {
        let err = text.parse::<JoinToken>().expect_err(&text).to_string();
        assert!(!err.contains(&secret), "{err}");
        assert!(!err.chars().any(char::is_control), "{err:?}");
    }
    assert!(!format!("{:?}", token()).contains(&secret));
    assert!(format!("{:?}", token()).contains("redacted"));
    let failure = crate::core::Failure::from("cbn1.x".parse::<JoinToken>().unwrap_err());
    assert_eq!(failure.retry(), crate::core::Retry::NeedsOperator);
    assert!(failure.message().starts_with("not a valid join token"));
}

#[test]
fn a_token_is_made_only_with_urls_it_can_carry() {
    let t = token();
    let made = JoinToken::new(t.id, t.secret.clone(), t.root, t.urls.clone()).unwrap();
    assert_eq!(made, t);
    assert!(JoinToken::new(t.id, t.secret.clone(), t.root, vec![]).is_err());
    assert!(JoinToken::new(t.id, t.secret.clone(), t.root, vec!["https://a,b".into()]).is_err());
    assert!(JoinToken::new(t.id, t.secret, t.root, vec!["http://a".into()]).is_err());
}

#[test]
fn gateway_urls_split_into_host_and_port() {
    assert_eq!(
        split_gateway_url("https://203.0.113.1:8443").unwrap(),
        ("203.0.113.1".into(), 8443)
    );
    assert_eq!(
        split_gateway_url("https://[2001:db8::1]").unwrap(),
        ("2001:db8::1".into(), 443)
    );
    assert_eq!(
        split_gateway_url("https://gw.example.net").unwrap(),
        ("gw.example.net".into(), 443)
    );
    assert!(check_gateway_url("https://gw.example.net/").is_err());
    assert!(check_gateway_url("https://").is_err());
}

#[test]
fn a_session_bearer_reads_back_and_never_shows_its_secret() {
    let s = Session {
        node_id: NodeId(12),
        secret: Secret32([9; 32]),
    };
    let bearer = s.bearer();
    assert!(bearer.starts_with("n12."));
    assert_eq!(bearer.parse::<Session>().unwrap(), s);
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Session>(&json).unwrap(), s);
    let secret = s.secret.to_b64url().to_string();
    assert!(!format!("{s:?}").contains(&secret));
    for bad in [
        "n12",
        "12.x",
        &format!("n012.{secret}"),
        &format!("n12.{secret}="),
    ] {
        let err = bad.parse::<Session>().unwrap_err().to_string();
        assert!(!err.contains(&secret));
    }
}

#[test]
fn a_cursor_reads_back_as_written_and_nothing_else() {
    let c = Cursor {
        store_id: 0xab,
        rev: 42,
    };
    assert_eq!(c.to_string(), "00000000000000ab.42");
    assert_eq!("00000000000000ab.42".parse::<Cursor>().unwrap(), c);
    assert_eq!(
        serde_json::to_string(&c).unwrap(),
        "\"00000000000000ab.42\""
    );
    for bad in [
        "ab.42",
        "00000000000000AB.42",
        "00000000000000ab.042",
        "00000000000000ab.",
        "00000000000000ab.-1",
        "00000000000000ab.42.1",
        "",
    ] {
        assert!(bad.parse::<Cursor>().is_err(), "{bad}");
    }
}

#[test]
fn node_ids_and_key_ids_have_one_spelling() {
    assert_eq!("n0".parse::<NodeId>().unwrap(), NodeId(0));
    assert_eq!(NodeId(12).to_string(), "n12");
    for bad in ["12", "n", "n012", "n+1", "N1", "n18446744073709551616"] {
        assert!(bad.parse::<NodeId>().is_err(), "{bad}");
    }
    let id = KeyId([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]);
    assert_eq!(id.to_string(), "deadbeef00010203");
    assert_eq!("deadbeef00010203".parse::<KeyId>().unwrap(), id);
    assert!("DEADBEEF00010203".parse::<KeyId>().is_err());
    assert!("+eadbeef00010203".parse::<KeyId>().is_err());
}

// ---- allocation ----

fn taken(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

#[test]
fn allocation_takes_the_lowest_free_host_address() {
    let pool = "10.100.0.0/24".parse().unwrap();
    assert_eq!(allocate(pool, &taken(&[]), &[]), Some(ip("10.100.0.1")));
    assert_eq!(
        allocate(
            pool,
            &taken(&["10.100.0.1", "10.100.0.2", "10.100.0.4"]),
            &[]
        ),
        Some(ip("10.100.0.3"))
    );
    assert_eq!(
        allocate(pool, &taken(&["10.100.0.2"]), &[ip("10.100.0.1")]),
        Some(ip("10.100.0.3")),
        "the gateways' own addresses are skipped"
    );
    // Addresses outside the pool do not matter.
    assert_eq!(
        allocate(pool, &taken(&["10.99.0.1", "fd00::1"]), &[ip("10.101.0.1")]),
        Some(ip("10.100.0.1"))
    );
}

#[test]
fn allocation_returns_none_when_the_pool_is_full() {
    let pool = "10.100.0.0/30".parse().unwrap();
    assert_eq!(
        allocate(pool, &taken(&["10.100.0.1"]), &[]),
        Some(ip("10.100.0.2"))
    );
    assert_eq!(
        allocate(pool, &taken(&["10.100.0.1", "10.100.0.2"]), &[]),
        None
    );
    assert_eq!(
        allocate(pool, &taken(&["10.100.0.1"]), &[ip("10.100.0.2")]),
        None
    );
    let single = "10.100.0.7/32".parse().unwrap();
    assert_eq!(allocate(single, &taken(&[]), &[]), Some(ip("10.100.0.7")));
    assert_eq!(allocate(single, &taken(&["10.100.0.7"]), &[]), None);
    let v6 = "fd00::/126".parse().unwrap();
    assert_eq!(allocate(v6, &taken(&[]), &[]), Some(ip("fd00::1")));
    assert_eq!(
        allocate(v6, &taken(&["fd00::1", "fd00::2"]), &[]),
        Some(ip("fd00::3"))
    );
    assert_eq!(
        allocate(v6, &taken(&["fd00::1", "fd00::2", "fd00::3"]), &[]),
        None
    );
}

#[test]
fn allocation_never_gives_an_address_twice() {
    let pool: ipnet::IpNet = "10.100.0.0/16".parse().unwrap();
    let mut used = BTreeSet::new();
    for _ in 0..2000 {
        let a = allocate(pool, &used, &[ip("10.100.0.1")]).unwrap();
        assert!(used.insert(a), "{a} given twice");
    }
    assert_eq!(used.first(), Some(&ip("10.100.0.2")));
    assert_eq!(used.last(), Some(&ip("10.100.7.209")));
}

// ---- wire ----

#[test]
fn wire_bodies_read_the_documented_json() {
    let req: wire::JoinRequest = serde_json::from_str(&format!(
        r#"{{"token_id":"0123456789abcdef","token_secret":"{}","name":"gpu-07","wg_key":"MzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzM=","endpoints":["198.51.100.7:51820"],"requested_address":null}}"#,
        Secret32([7; 32]).to_b64url().as_str()
    ))
    .unwrap();
    assert_eq!(req.wg_key, PeerKey([0x33; 32]));
    assert!(!format!("{req:?}").contains(Secret32([7; 32]).to_b64url().as_str()));
    let up = Update::empty_delta(
        Cursor {
            store_id: 1,
            rev: 2,
        },
        vec![],
    );
    let text = serde_json::to_string(&up).unwrap();
    assert!(text.contains(r#""kind":"delta""#), "{text}");
    assert_eq!(serde_json::from_str::<Update>(&text).unwrap(), up);
    assert!(up.is_empty());
    let err: wire::ErrorBody =
        serde_json::from_str(r#"{"error":"token already used","retry":false}"#).unwrap();
    assert!(!err.retry);
    assert!(
        serde_json::from_str::<wire::ErrorBody>(r#"{"error":"x","retry":false,"y":1}"#).is_err()
    );
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_token_reads_back_as_written(
            id in any::<[u8; 8]>(),
            secret in any::<[u8; 32]>(),
            root in any::<[u8; 32]>(),
            hosts in proptest::collection::vec(("[a-z][a-z0-9-]{0,10}[a-z0-9]", any::<Option<u16>>()), 1..4),
        ) {
            let urls: Vec<String> = hosts
                .iter()
                .map(|(h, port)| match port {
                    Some(p) if *p != 0 => format!("https://{h}:{p}"),
                    _ => format!("https://{h}"),
                })
                .collect();
            let token = JoinToken::new(TokenId(id), Secret32(secret), RootKey(root), urls).unwrap();
            let text = token.to_string();
            prop_assert_eq!(text.parse::<JoinToken>().unwrap(), token);
        }

        #[test]
        fn allocation_is_the_lowest_address_a_full_scan_finds(
            prefix in 26u8..=32,
            taken_bits in any::<u64>(),
            reserved_bit in 0u32..64,
        ) {
            let pool: ipnet::IpNet = format!("10.100.0.0/{prefix}").parse().unwrap();
            let hosts: Vec<IpAddr> = pool.hosts().collect();
            let taken: BTreeSet<IpAddr> = hosts
                .iter()
                .enumerate()
                .filter(|(i, _)| *i < 64 && taken_bits & (1 << i) != 0)
                .map(|(_, a)| *a)
                .collect();
            let reserved = [IpAddr::from([10, 100, 0, reserved_bit as u8])];
            let expected = hosts
                .iter()
                .find(|a| !taken.contains(a) && !reserved.contains(a))
                .copied();
            prop_assert_eq!(allocate(pool, &taken, &reserved), expected);
        }
    }
}
