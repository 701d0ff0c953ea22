//! The gateway's TLS identity: a self-signed CA whose key is the cluster's root key (so the
//! root key a token pins is what a joining node finds in the chain), and a leaf for this
//! gateway's HTTPS endpoint issued under it at each start.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519,
};
use rustls::pki_types::pem::PemObject as _;
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
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|der| der.to_vec())
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
    leaf.not_before = utc(now.saturating_sub(86_400))?;
    leaf.not_after = utc(now + LEAF_VALIDITY_S)?;
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

fn utc(unix: u64) -> Result<time::OffsetDateTime, GatewayError> {
    i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .ok_or_else(|| GatewayError::operator(format!("time {unix} is out of range")))
}

/// A certificate's notAfter as a Unix time, so a kept `tls.crt` can be checked without the
/// root key.
pub fn not_after(cert_der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok()
}
