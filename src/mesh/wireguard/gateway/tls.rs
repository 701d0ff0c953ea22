//! The pinned TLS check a node runs before it sends a gateway anything: the server's chain must
//! contain a certificate whose key is the cluster's root key (carried in the join token and in
//! the session), and the leaf must verify against that key as the only trust anchor. The
//! system's roots play no part, so a gateway with a publicly trusted certificate but another
//! root key is refused, and the token's secret never leaves the node.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, Der, ServerName, TrustAnchor, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

/// An Ed25519 SubjectPublicKeyInfo without its outer SEQUENCE header, as webpki keeps a trust
/// anchor's key: AlgorithmIdentifier { id-Ed25519 } then the BIT STRING of the raw key.
fn ed25519_spki_value(key: &[u8; 32]) -> Vec<u8> {
    let mut spki = vec![0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    spki.extend_from_slice(key);
    spki
}

/// Accepts a server only if its chain is anchored in `root` (a raw Ed25519 public key).
#[derive(Debug)]
pub struct PinnedRoot {
    spki: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl PinnedRoot {
    pub fn new(root: [u8; 32]) -> Self {
        Self {
            spki: ed25519_spki_value(&root),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// The trust anchor the chain offers for the pinned key: the subject of the first chain
    /// certificate whose key is the pinned one, with the pinned key itself (not the cert's
    /// bytes) as the anchor's key.
    fn anchor(&self, chain: &[CertificateDer<'_>]) -> Option<TrustAnchor<'static>> {
        chain.iter().find_map(|cert| {
            let mut store = RootCertStore::empty();
            store.add(cert.clone()).ok()?;
            let found = store.roots.pop()?;
            (found.subject_public_key_info.as_ref() == self.spki.as_slice()).then(|| TrustAnchor {
                subject: found.subject,
                subject_public_key_info: Der::from(self.spki.clone()),
                name_constraints: None,
            })
        })
    }
}

/// A client TLS configuration that trusts only `root`.
pub fn client_config(root: [u8; 32]) -> Arc<rustls::ClientConfig> {
    let verifier = Arc::new(PinnedRoot::new(root));
    let provider = Arc::clone(&verifier.provider);
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|builder| {
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        });
    // The ring provider supports the default versions; nothing else can fail here.
    Arc::new(config.unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3")))
}

impl ServerCertVerifier for PinnedRoot {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let Some(anchor) = self.anchor(intermediates) else {
            tracing::warn!(component = "gateway-client", server = ?server_name, "gateway's certificate chain is not anchored in the cluster's root key; refused");
            return Err(Error::InvalidCertificate(CertificateError::UnknownIssuer));
        };
        let roots = RootCertStore {
            roots: vec![anchor],
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| Error::General(format!("cannot build the pinned verifier: {e}")))?;
        webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Certificates and a blocking TLS server for the tests here and in the client's tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::{CertificateParams, Issuer, KeyPair, PKCS_ED25519};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    /// A cluster's root CA (Ed25519) and a leaf for 127.0.0.1 it issued.
    pub struct Chain {
        pub root_key: [u8; 32],
        pub certs: Vec<CertificateDer<'static>>,
        pub leaf_key: PrivateKeyDer<'static>,
    }

    pub fn chain() -> Chain {
        chain_under(KeyPair::generate_for(&PKCS_ED25519).unwrap())
    }

    /// A chain under the root key whose PKCS#8 document is `root_pkcs8`.
    pub fn chain_for(root_pkcs8: &[u8]) -> Chain {
        let der = PrivatePkcs8KeyDer::from(root_pkcs8.to_vec());
        chain_under(KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ED25519).unwrap())
    }

    fn chain_under(ca_key: KeyPair) -> Chain {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "clawnode cluster root");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, &ca_key);
        let leaf_key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        Chain {
            root_key: ca_key.public_key_raw().try_into().unwrap(),
            certs: vec![leaf.der().clone(), ca.der().clone()],
            leaf_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        }
    }

    /// A TLS server on loopback that serves `chain` and counts the application bytes it
    /// receives (a request body would be some).
    pub struct Server {
        pub addr: SocketAddr,
        pub received: Arc<AtomicUsize>,
    }

    pub fn serve(chain: Chain, response: &'static [u8]) -> Server {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain.certs, chain.leaf_key)
        .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&received);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut tcp) = stream else { continue };
                let mut conn = rustls::ServerConnection::new(Arc::clone(&config)).unwrap();
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let mut buf = [0u8; 4096];
                // A refused handshake ends here with an error and nothing read.
                if let Ok(n) = tls.read(&mut buf) {
                    counter.fetch_add(n, Ordering::SeqCst);
                    let _ = tls.write_all(response);
                    let _ = tls.flush();
                }
                conn.send_close_notify();
                let _ = conn.complete_io(&mut tcp);
            }
        });
        Server { addr, received }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::testing::{chain, serve};
    use super::*;

    async fn post_secret(root: [u8; 32], addr: std::net::SocketAddr) -> Result<u16, String> {
        let client = super::super::client::https(client_config(root));
        let request = hyper::Request::post(format!("https://{addr}/v1/join"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"{\"token_secret\":\"s3cret\"}",
            )))
            .unwrap();
        client
            .request(request)
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| crate::http::source_chain(&e))
    }

    #[tokio::test]
    async fn a_gateway_whose_chain_is_under_another_root_key_never_receives_the_secret() {
        let pinned = chain().root_key;
        let impostor = serve(chain(), b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");

        let error = post_secret(pinned, impostor.addr).await.unwrap_err();

        assert!(error.contains("UnknownIssuer"), "{error}");
        assert_eq!(impostor.received.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_gateway_anchored_in_the_pinned_root_key_is_accepted() {
        let real = chain();
        let root = real.root_key;
        let server = serve(real, b"HTTP/1.1 204 No Content\r\n\r\n");

        let status = post_secret(root, server.addr).await.unwrap();

        assert_eq!(status, 204);
        assert!(server.received.load(Ordering::SeqCst) > 0);
    }

    #[tokio::test]
    async fn a_chain_that_carries_the_real_ca_certificate_but_a_leaf_from_another_key_is_refused() {
        // The CA certificate is public: an impostor can append it to a chain of its own.
        let real = chain();
        let mut forged = chain();
        forged.certs.push(real.certs[1].clone());
        let server = serve(forged, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");

        let error = post_secret(real.root_key, server.addr).await.unwrap_err();

        assert!(error.contains("invalid peer certificate"), "{error}");
        assert_eq!(server.received.load(Ordering::SeqCst), 0);
    }
}
