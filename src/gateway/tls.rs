//! The gateway's TLS identity: a self-signed CA whose key is the cluster's root key (so the
//! root key a token pins is what a joining node finds in the chain), and a leaf for this
//! gateway's HTTPS endpoint issued under it at each start.

use std::sync::Arc;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::GatewayError;

/// The CA's fields, rebuilt the same way whenever a leaf is issued: the leaf's issuer name must
/// equal the CA's subject.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "clawnode cluster root");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn root_pair(root_pkcs8: &[u8]) -> Result<KeyPair, GatewayError> {
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(root_pkcs8), &PKCS_ED25519)
        .map_err(|e| GatewayError::operator(format!("the root key does not load: {e}")))
}

/// The self-signed CA certificate (PEM) for the root key. No expiry to speak of (rcgen's
/// default, year 4096): a CA that expires takes every gateway's TLS down at once.
pub fn ca_pem(root_pkcs8: &[u8]) -> Result<String, GatewayError> {
    let pair = root_pair(root_pkcs8)?;
    let cert = ca_params()
        .self_signed(&pair)
        .map_err(|e| GatewayError::operator(format!("cannot make the CA certificate: {e}")))?;
    Ok(cert.pem())
}

/// The first certificate in a PEM text, as DER.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let body = pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)?
        .split("-----END CERTIFICATE-----")
        .next()?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// How long a leaf is valid. Re-issued at every start that has the root key.
pub const LEAF_VALIDITY_S: u64 = 365 * 86_400;
/// A kept leaf (the root key moved offline) this close to expiry is warned about.
pub const LEAF_WARN_S: u64 = 30 * 86_400;

/// A leaf for `names` (host names or IP addresses), issued by the root key at `now`: valid
/// from a day before (clocks differ) for [`LEAF_VALIDITY_S`]. `(leaf DER, its PKCS#8 key)`.
pub fn issue_leaf(
    root_pkcs8: &[u8],
    names: &[String],
    now: u64,
) -> Result<(Vec<u8>, Vec<u8>), GatewayError> {
    let root = root_pair(root_pkcs8)?;
    let params = ca_params();
    let issuer = Issuer::from_params(&params, &root);
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| GatewayError::transient(format!("cannot make a TLS key: {e}")))?;
    let mut leaf = CertificateParams::new(names.to_vec())
        .map_err(|e| GatewayError::operator(format!("bad TLS names {names:?}: {e}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "clawnode gateway");
    leaf.distinguished_name = dn;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let (y, m, d) = civil_date(now.saturating_sub(86_400));
    leaf.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_date(now + LEAF_VALIDITY_S);
    leaf.not_after = rcgen::date_time_ymd(y, m, d);
    let cert = leaf
        .signed_by(&leaf_key, &issuer)
        .map_err(|e| GatewayError::operator(format!("cannot issue the TLS certificate: {e}")))?;
    Ok((cert.der().to_vec(), leaf_key.serialize_der()))
}

/// The rustls server configuration: chain `[leaf, ca]`, TLS 1.2 and 1.3, HTTP/1.1.
pub fn server_config(
    leaf_der: Vec<u8>,
    leaf_key: Vec<u8>,
    ca_der: Vec<u8>,
) -> Result<Arc<rustls::ServerConfig>, GatewayError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::operator(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf_der), CertificateDer::from(ca_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key)),
        )
        .map_err(|e| GatewayError::operator(format!("the TLS certificate does not load: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Stateless tickets: a node that reconnects resumes without the certificate chain and
    // without a signature from the gateway, and the gateway keeps no per-node session state.
    // One ticket per handshake is enough, as a node holds one connection.
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| GatewayError::transient(format!("TLS session tickets: {e}")))?;
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

/// The UTC calendar date of a Unix time (the days-from-civil algorithm, inverted).
fn civil_date(unix: u64) -> (i32, u8, u8) {
    let days = (unix / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// Days since 1970-01-01 of a calendar date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One DER element at the start of `der`: `(tag, contents, rest)`.
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A certificate's notAfter as a Unix time (read from the DER, so a kept `tls.crt` can be
/// checked without the root key).
pub fn not_after(cert_der: &[u8]) -> Option<u64> {
    let (_, cert, _) = der_element(cert_der)?;
    let (_, tbs, _) = der_element(cert)?;
    let mut rest = tbs;
    // [0] version (optional), serial, signature algorithm, issuer, then validity.
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..3 {
        rest = der_element(rest)?.2;
    }
    let (_, validity, _) = der_element(rest)?;
    let (_, _, validity) = der_element(validity)?;
    let (tag, time, _) = der_element(validity)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        // UTCTime: YYMMDDHHMMSSZ, 1950-2049.
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, text.get(2..)?)
        }
        // GeneralizedTime: YYYYMMDDHHMMSSZ.
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |at: usize| -> Option<u32> { rest.get(at..at + 2)?.parse().ok() };
    let days = days_from_civil(year, field(0)?, field(2)?);
    let secs = days * 86_400
        + i64::from(field(4)?) * 3600
        + i64::from(field(6)?) * 60
        + i64::from(field(8)?);
    u64::try_from(secs).ok()
}
