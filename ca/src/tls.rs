//! Mesh mTLS: workload credentials, the SPIFFE certificate checks, and rustls configs.
//!
//! rustls' stock server verifier checks DNS names, and SVIDs carry only a URI SAN, so the client side
//! uses [`SpiffeServerVerifier`]: chain to the mesh root (which also checks validity and the serverAuth
//! EKU) and then an exact match of the single URI SAN against the identities pilot says the peer may
//! have. The server side wraps rustls' client verifier and adds the same SVID rules plus a trust-domain
//! check. Rules (SPIFFE X509-SVID, reliability-security.md §2.1): exactly one URI SAN, a SPIFFE ID;
//! not a CA, no keyCertSign/cRLSign; an EKU extension naming the purpose; an ID in a DNS SAN is no ID.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::*;

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// ALPN for HTTP/2, the protocol all of weft's gRPC and sidecar-to-sidecar traffic uses.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider every weft config is built with (ring; never the process default, so two
/// providers in the dependency graph can never make rustls panic).
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first, as Envoy and HAProxy prefer it: as strong as the mesh needs and four fewer
    // AES rounds per block than rustls's default first choice, AES-256-GCM, on every byte of every
    // mesh connection. The others stay, for peers that only offer them.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Installs ring as the process-wide rustls provider, for libraries that build their own configs.
/// Harmless if one is already installed.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why TLS material or a peer certificate is not acceptable.
#[derive(Clone, thiserror::Error)]
pub enum SvidError {
    /// DER that does not parse as X.509.
    #[error("certificate does not parse: {0}")]
    Parse(String),
    /// Not exactly one URI SAN.
    #[error("certificate has {0} URI SANs; an SVID has exactly one")]
    UriSanCount(usize),
    /// The URI SAN is not a SPIFFE ID of the workload shape.
    #[error("certificate URI SAN {uri:?} is not a workload SPIFFE ID: {reason}")]
    BadId {
        /// The SAN.
        uri: String,
        /// Why it was rejected.
        reason: SpiffeIdError,
    },
    /// CA:TRUE or certificate/CRL signing key usage on a leaf.
    #[error("certificate is a CA certificate, not a workload SVID")]
    IsCa,
    /// EKU missing or without the purpose this handshake needs.
    #[error("certificate lacks the {0} extended key usage")]
    Eku(&'static str),
    /// Trust domain other than the mesh's.
    #[error("peer {id} is outside trust domain {expected}")]
    TrustDomain {
        /// The peer's ID.
        id: SpiffeId,
        /// The trust domain required.
        expected: String,
    },
    /// A valid SVID, but not one of the identities the destination may have.
    #[error("peer is {got}, expected {}", expected_list(.expected))]
    UnexpectedPeer {
        /// The peer's ID.
        got: SpiffeId,
        /// Identities that would have been accepted.
        expected: Vec<SpiffeId>,
    },
    /// No certificate in the PEM input.
    #[error("no certificate in the chain")]
    EmptyChain,
    /// The private key is unusable or does not match the leaf.
    #[error("private key: {0}")]
    Key(String),
}

// rustls renders a verifier's error with `{:?}` ("invalid peer certificate: Other(OtherError(..))"), and
// that line is what operators read in handshake-failure logs: make it the human message.
impl std::fmt::Debug for SvidError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn expected_list(ids: &[SpiffeId]) -> String {
    ids.iter()
        .map(SpiffeId::as_str)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The EKU a certificate must carry for its role in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// It authenticates a server.
    ServerAuth,
    /// It authenticates a client.
    ClientAuth,
}

/// Applies the SVID rules to a leaf and returns its identity. Chain, signature and validity are checked
/// by webpki before this is called.
pub fn check_svid(der: &[u8], purpose: Purpose) -> Result<SpiffeId, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Parse(e.to_string()))?;
    if cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca)
        || cert
            .key_usage()
            .ok()
            .flatten()
            .is_some_and(|ku| ku.value.key_cert_sign() || ku.value.crl_sign())
    {
        return Err(SvidError::IsCa);
    }
    let eku = cert.extended_key_usage().ok().flatten().map(|e| e.value);
    let ok = match purpose {
        Purpose::ServerAuth => eku.is_some_and(|e| e.server_auth),
        Purpose::ClientAuth => eku.is_some_and(|e| e.client_auth),
    };
    if !ok {
        return Err(SvidError::Eku(match purpose {
            Purpose::ServerAuth => "serverAuth",
            Purpose::ClientAuth => "clientAuth",
        }));
    }
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(|reason| SvidError::BadId {
            uri: (*uri).to_owned(),
            reason,
        }),
        other => Err(SvidError::UriSanCount(other.len())),
    }
}

/// The SPIFFE ID of a peer's leaf certificate, if it has a well-formed one (for authorization after
/// the handshake, which already enforced the rules).
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    let leaf = certs.first()?;
    check_svid(leaf, Purpose::ClientAuth)
        .or_else(|_| check_svid(leaf, Purpose::ServerAuth))
        .ok()
}

/// A trust bundle: the mesh root(s) every peer must chain to. Clones share one live set of roots:
/// [`TrustBundle::replace_pem`] swaps it (a root rotation adds a root, later removes the old one), and
/// every verifier built from the bundle checks new handshakes against the roots current at that
/// moment, read through an `ArcSwap` snapshot (no lock, no rebuild per handshake).
#[derive(Clone)]
pub struct TrustBundle {
    current: Arc<ArcSwap<Roots>>,
}

/// One version of the roots, with the client verifiers rustls builds from them (built once per
/// version, not per handshake).
struct Roots {
    store: Arc<RootCertStore>,
    ders: Vec<CertificateDer<'static>>,
    required: Arc<dyn ClientCertVerifier>,
    optional: Arc<dyn ClientCertVerifier>,
}

impl Roots {
    fn parse(pem: &str) -> Result<Self, SvidError> {
        let mut store = RootCertStore::empty();
        let mut ders = Vec::new();
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let der = der.map_err(|e| SvidError::Parse(e.to_string()))?;
            store
                .add(der.clone())
                .map_err(|e| SvidError::Parse(e.to_string()))?;
            ders.push(der);
        }
        if store.is_empty() {
            return Err(SvidError::EmptyChain);
        }
        let store = Arc::new(store);
        let verifier = |mandatory: bool| {
            let builder = WebPkiClientVerifier::builder_with_provider(store.clone(), provider());
            let builder = if mandatory {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            builder.build().map_err(|e| SvidError::Parse(e.to_string()))
        };
        Ok(Self {
            required: verifier(true)?,
            optional: verifier(false)?,
            store,
            ders,
        })
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.len())
            .finish()
    }
}

impl TrustBundle {
    /// Parses one or more PEM root certificates (several during a root rotation).
    pub fn from_pem(pem: &str) -> Result<Self, SvidError> {
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(Roots::parse(pem)?)),
        })
    }

    /// Replaces the roots with those in `pem` for every handshake from now on (connections already
    /// established are not affected). Returns whether anything changed; on an error (nothing
    /// parseable, no certificate) the current roots stay.
    pub fn replace_pem(&self, pem: &str) -> Result<bool, SvidError> {
        let next = Roots::parse(pem)?;
        if next.ders == self.current.load().ders {
            return Ok(false);
        }
        self.current.store(Arc::new(next));
        Ok(true)
    }

    /// The rustls root store in force now.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.current.load().store.clone()
    }

    /// How many roots are trusted now (2 during a root rotation).
    pub fn len(&self) -> usize {
        self.current.load().ders.len()
    }

    /// Never true: a bundle always holds a root (kept for clippy's `len` convention).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A workload's certificate and key, ready for rustls.
#[derive(Debug)]
pub struct Credentials {
    identity: SpiffeId,
    not_after: SystemTime,
    certified: Arc<CertifiedKey>,
}

impl Credentials {
    /// Builds credentials from a chain (leaf first; a trailing self-signed root is dropped, peers have
    /// it already) and the leaf's private key in PEM.
    pub fn from_pem(chain: &[String], key_pem: &str) -> Result<Self, SvidError> {
        let mut ders = Vec::with_capacity(chain.len());
        for pem in chain {
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                ders.push(der.map_err(|e| SvidError::Parse(e.to_string()))?);
            }
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| SvidError::Key(e.to_string()))?;
        Self::from_der(ders, key)
    }

    /// Builds credentials from DER (see [`Credentials::from_pem`]).
    pub fn from_der(
        mut chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let (_, parsed) =
            X509Certificate::from_der(leaf).map_err(|e| SvidError::Parse(e.to_string()))?;
        let not_after = SystemTime::from(parsed.validity().not_after.to_datetime());
        let identity = check_svid(leaf, Purpose::ClientAuth)?;
        if chain.len() > 1 && chain.last().is_some_and(|c| is_self_signed(c)) {
            chain.pop();
        }
        let certified = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| SvidError::Key(e.to_string()))?;
        Ok(Self {
            identity,
            not_after,
            certified: Arc::new(certified),
        })
    }

    /// The identity these credentials prove.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// When the leaf expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.subject() == c.issuer() && c.verify_signature(None).is_ok())
        .unwrap_or(false)
}

/// The current credentials of a workload, swappable at rotation without touching open connections
/// (a certificate is only used during a handshake), with the counts of renewals for metrics.
#[derive(Debug)]
pub struct CredentialStore {
    current: ArcSwap<Credentials>,
    renewals: AtomicU64,
    failures: AtomicU64,
}

impl CredentialStore {
    /// Starts with `creds`.
    pub fn new(creds: Credentials) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(creds),
            renewals: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    /// Replaces the credentials; new handshakes use them from now on. Counts as a renewal.
    pub fn rotate(&self, creds: Credentials) {
        self.current.store(Arc::new(creds));
        self.renewals.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a renewal attempt that failed (the current credentials stay).
    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Renewals so far (the first certificate is not one).
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }

    /// Failed renewal attempts so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The credentials in force.
    pub fn current(&self) -> Arc<Credentials> {
        self.current.load_full()
    }

    /// Whether the certificate in force is still valid at `now` (an expired one makes every mesh
    /// handshake fail, so readiness depends on it).
    pub fn valid_at(&self, now: SystemTime) -> bool {
        self.current.load().not_after > now
    }
}

impl ResolvesServerCert for CredentialStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified.clone())
    }
}

impl ResolvesClientCert for CredentialStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn svid_err(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Client-side verifier: the server must chain to the mesh root and be one of `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: Vec<SpiffeId>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// Accepts servers with any of `expected` identities.
    pub fn new(bundle: &TrustBundle, expected: Vec<SpiffeId>) -> Self {
        Self {
            bundle: bundle.clone(),
            expected,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.current.load().store,
            intermediates,
            now,
            self.algs.all,
        )?;
        let id = check_svid(end_entity, Purpose::ServerAuth).map_err(svid_err)?;
        if !self.expected.contains(&id) {
            return Err(svid_err(SvidError::UnexpectedPeer {
                got: id,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server-side verifier: a client must present an SVID of the mesh's trust domain chained to the root.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: TrustBundle,
    trust_domain: String,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// `mandatory`: refuse clients without a certificate (STRICT); otherwise they may connect
    /// unauthenticated and carry no identity.
    pub fn new(bundle: &TrustBundle, trust_domain: &str, mandatory: bool) -> Self {
        Self {
            bundle: bundle.clone(),
            trust_domain: trust_domain.to_owned(),
            mandatory,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    // The hints (certificate_authorities) cannot borrow from a bundle that may be swapped under
    // them; they are optional in TLS 1.3, and mesh clients have a single certificate to offer anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let roots = self.bundle.current.load();
        let inner = if self.mandatory {
            &roots.required
        } else {
            &roots.optional
        };
        inner.verify_client_cert(end_entity, intermediates, now)?;
        let id = check_svid(end_entity, Purpose::ClientAuth).map_err(svid_err)?;
        if id.trust_domain() != self.trust_domain {
            return Err(svid_err(SvidError::TrustDomain {
                id,
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// How a TLS server treats client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificate asked for (the CA: callers authenticate by token).
    None,
    /// A mesh client certificate is required (STRICT).
    Required,
    /// A mesh client certificate is verified if sent (PERMISSIVE over TLS).
    Optional,
}

/// A TLS server config presenting `store`'s certificate.
pub fn server_config(
    store: Arc<CredentialStore>,
    bundle: &TrustBundle,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, SvidError> {
    let td = store.current().identity().trust_domain().to_owned();
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SvidError::Key(e.to_string()))?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required => builder
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundle, &td, true))),
        ClientAuth::Optional => builder
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundle, &td, false))),
    };
    let mut config = builder.with_cert_resolver(store);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    if client_auth != ClientAuth::None {
        // A resumed session skips certificate verification on both sides, so a client whose root
        // was removed from the bundle (the last step of a root rotation) could still get in with an
        // earlier session. Full handshakes only: mesh connections are long-lived HTTP/2, so a
        // handshake per connection costs little.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

/// A TLS client config that accepts only servers with one of `expected` identities, presenting
/// `store`'s certificate when given.
pub fn client_config(
    store: Option<Arc<CredentialStore>>,
    bundle: &TrustBundle,
    expected: Vec<SpiffeId>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, SvidError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SvidError::Key(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundle, expected)));
    let mut config = match store {
        Some(store) => builder.with_client_cert_resolver(store),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[cfg(test)]
mod tests;
