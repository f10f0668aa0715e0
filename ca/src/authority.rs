//! The certificate authority itself: its key material on disk and the signing of workload certificates.
//!
//! Files in the data directory (names follow Istio's `cacerts` secret):
//! - `ca-key.pem`: the signing key (PKCS#8, mode 0600).
//! - `cert-chain.pem`: the signing certificate first, then any intermediates, the root last. For the
//!   self-signed root that weft creates on first start, it is the root alone.
//! - `root-cert.pem`: the root alone (what `ca root` prints and every client is given as `--ca-root`).
//! - `token-key.pem`: the P-256 key that signs bootstrap tokens (mode 0600). It is kept apart from the
//!   signing key so an operator's CA (which may be RSA) can be plugged in or rotated without
//!   invalidating tokens, and so that a leaked token key cannot mint certificates.
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of the directory), so a crash
//! leaves the old or the new file, never half of one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ::time::OffsetDateTime;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
    PKCS_RSA_SHA256, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::*;

use crate::spiffe::SpiffeId;
use crate::token::{TokenError, TokenIdentity, TokenSigner, TokenVerifier};

/// Signing key file name.
pub const KEY_FILE: &str = "ca-key.pem";
/// Signing certificate chain file name (signing cert first, root last).
pub const CHAIN_FILE: &str = "cert-chain.pem";
/// Root certificate file name.
pub const ROOT_FILE: &str = "root-cert.pem";
/// The signing certificate alone, in Istio's plug-in layout (`cacerts`).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// Token signing key file name.
pub const TOKEN_KEY_FILE: &str = "token-key.pem";

/// Largest CSR accepted, in bytes of PEM (an RSA-4096 CSR is under 2 KiB).
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// How far notBefore is set in the past, for clock skew between CA and peers.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// Requests beyond this are not a policy question but a bug (e.g. milliseconds sent as seconds).
pub const ABSURD_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Lifetime of a self-signed root (Istio's `DefaultSelfSignedCACertTTL`).
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Policy knobs of the authority.
#[derive(Debug, Clone)]
pub struct AuthorityOptions {
    /// Trust domain of issued SPIFFE IDs.
    pub trust_domain: String,
    /// Validity when the request asks for none.
    pub default_ttl: Duration,
    /// Longest validity ever issued; longer requests are capped.
    pub max_ttl: Duration,
}

impl Default for AuthorityOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// Failures loading, creating or importing the CA's key material.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// File system error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is unusable.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Only one of the CA files is present.
    #[error(
        "{dir}: found {present} but not {missing}; restore it or start from an empty directory"
    )]
    Incomplete {
        /// The data directory.
        dir: PathBuf,
        /// File that exists.
        present: &'static str,
        /// File that is missing.
        missing: &'static str,
    },
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("invalid trust domain {0:?}: {1}")]
    TrustDomain(String, crate::spiffe::SpiffeIdError),
    /// rcgen could not build a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The token key is unusable.
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Why a signing request was refused. Each maps to one gRPC status in `server`.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The CSR is larger than [`MAX_CSR_LEN`].
    #[error("CSR is {0} bytes; at most 16384 are accepted")]
    CsrTooLarge(usize),
    /// Not a PEM `CERTIFICATE REQUEST`.
    #[error("CSR is not a PEM CERTIFICATE REQUEST")]
    CsrPem,
    /// PEM decoded but the DER does not parse.
    #[error("CSR does not parse: {0}")]
    CsrDer(String),
    /// The CSR's self-signature does not verify.
    #[error("CSR signature does not verify")]
    CsrSignature,
    /// Key algorithm or size not accepted.
    #[error("CSR key type not accepted: {0}; use ECDSA P-256/P-384 or RSA 2048-4096")]
    KeyType(String),
    /// The CSR names an identity other than the caller's.
    #[error("CSR asks for identity {requested} but the caller is authenticated as {authenticated}")]
    IdentityMismatch {
        /// What the CSR asked for.
        requested: String,
        /// What the token proves.
        authenticated: String,
    },
    /// The CSR asks for DNS names the caller may not have (see [`crate::dns`]).
    #[error(transparent)]
    DnsName(#[from] crate::dns::DnsSanError),
    /// The requested validity makes no sense.
    #[error("requested validity {0} s is invalid: {1}")]
    Validity(i64, &'static str),
    /// The CA's own signing certificate has expired.
    #[error("the CA's signing certificate has expired; plug in a new one")]
    CaExpired,
    /// rcgen failed to produce the certificate.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// The loaded authority: signs CSRs and issues/verifies bootstrap tokens.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    issuer_not_after: SystemTime,
    /// Signing cert .. root, PEM, appended after each leaf.
    chain_pem: Vec<String>,
    root_pem: String,
    options: AuthorityOptions,
    token_signer: TokenSigner,
    token_verifier: TokenVerifier,
    rng: SystemRandom,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.options.trust_domain)
            .field("chain_len", &self.chain_pem.len())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads the CA from `dir`, creating a self-signed root (and the token key) on first start.
    pub fn load_or_create(dir: &Path, options: AuthorityOptions) -> Result<Self, AuthorityError> {
        crate::spiffe::SpiffeId::new(&options.trust_domain, "a", "b")
            .map_err(|e| AuthorityError::TrustDomain(options.trust_domain.clone(), e))?;
        fs::create_dir_all(dir).map_err(|source| AuthorityError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let key_path = dir.join(KEY_FILE);
        let chain_path = dir.join(CHAIN_FILE);
        match (key_path.exists(), chain_path.exists()) {
            (true, true) => {}
            (false, false) => create_root(dir, &options.trust_domain)?,
            (true, false) => {
                return Err(AuthorityError::Incomplete {
                    dir: dir.to_owned(),
                    present: KEY_FILE,
                    missing: CHAIN_FILE,
                });
            }
            (false, true) => {
                return Err(AuthorityError::Incomplete {
                    dir: dir.to_owned(),
                    present: CHAIN_FILE,
                    missing: KEY_FILE,
                });
            }
        }
        let key_pem = read(&key_path)?;
        let chain_text = read(&chain_path)?;
        let loaded = validate_ca(&chain_path, &chain_text, &key_path, &key_pem)?;
        let root_pem = loaded.chain_pem.last().cloned().unwrap_or_default();
        // root-cert.pem is derived: rewrite it if it is missing or stale.
        let root_path = dir.join(ROOT_FILE);
        if fs::read_to_string(&root_path).ok().as_deref() != Some(root_pem.as_str()) {
            write_atomic(&root_path, root_pem.as_bytes(), 0o644)?;
        }
        let token_signer = load_or_create_token_key(dir)?;
        Ok(Self::assemble(loaded, options, token_signer))
    }

    /// Loads an operator's CA from Istio's plug-in layout (the `cacerts` Secret mounted as files),
    /// so that several CA replicas share one root. Nothing is generated or written there:
    /// - `ca-cert.pem`: the CA's signing certificate (the root itself, or an intermediate);
    /// - `ca-key.pem`: its key;
    /// - `cert-chain.pem`: `ca-cert.pem` followed by the intermediates up to the root (the root may
    ///   be left out; it is then taken from `root-cert.pem`);
    /// - `root-cert.pem`: the root, what workloads trust.
    ///
    /// A missing file, a key that does not match `ca-cert.pem`, or a chain that does not end at
    /// `root-cert.pem` is an error. The weft token key (only used by `--auth weft`) is kept in
    /// `token_dir` when given, else made for this process alone.
    pub fn load_cacerts(
        cacerts: &Path,
        token_dir: Option<&Path>,
        options: AuthorityOptions,
    ) -> Result<Self, AuthorityError> {
        crate::spiffe::SpiffeId::new(&options.trust_domain, "a", "b")
            .map_err(|e| AuthorityError::TrustDomain(options.trust_domain.clone(), e))?;
        let [ca_cert_path, key_path, chain_path, root_path] =
            [CA_CERT_FILE, KEY_FILE, CHAIN_FILE, ROOT_FILE].map(|f| cacerts.join(f));
        let ca_cert = read_certs(&ca_cert_path)?;
        let root = read_certs(&root_path)?;
        // Istio allows an empty cert-chain.pem when ca-cert.pem is the root itself.
        let chain = match read_certs(&chain_path) {
            Err(AuthorityError::BadFile { reason, .. }) if reason == NO_CERTIFICATE => {
                ca_cert.clone()
            }
            other => other?,
        };
        let key_pem = read(&key_path)?;
        let bad = |path: &Path, reason: &str| AuthorityError::BadFile {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        if ca_cert.len() != 1 {
            return Err(bad(&ca_cert_path, "must hold exactly one certificate"));
        }
        if root.len() != 1 {
            return Err(bad(
                &root_path,
                "must hold exactly one certificate, the root",
            ));
        }
        let self_signed = X509Certificate::from_der(&root[0])
            .is_ok_and(|(_, c)| c.subject() == c.issuer() && c.verify_signature(None).is_ok());
        if !self_signed {
            return Err(bad(&root_path, "is not a self-signed root certificate"));
        }
        if chain[0] != ca_cert[0] {
            return Err(bad(
                &chain_path,
                "must start with the certificate of ca-cert.pem",
            ));
        }
        let mut full = chain;
        if full.last() != root.first() {
            // Istio accepts a chain without the root; validate_ca then checks the last link.
            full.extend(root.iter().cloned());
        }
        let full_text: String = full.iter().map(|d| to_pem(d)).collect();
        let loaded = validate_ca(&chain_path, &full_text, &key_path, &key_pem).map_err(|e| {
            match e {
                // The links are checked over cert-chain.pem + root-cert.pem: say so.
                AuthorityError::BadFile { reason, .. }
                    if reason.contains("signed by certificate") =>
                {
                    bad(
                        &chain_path,
                        &format!("does not end at root-cert.pem ({reason}, the root counted last)"),
                    )
                }
                other => other,
            }
        })?;
        let token_signer = match token_dir {
            Some(dir) => {
                fs::create_dir_all(dir).map_err(|source| AuthorityError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
                load_or_create_token_key(dir)?
            }
            None => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                TokenSigner::from_pkcs8(&key.serialize_der())?
            }
        };
        Ok(Self::assemble(loaded, options, token_signer))
    }

    fn assemble(loaded: LoadedCa, options: AuthorityOptions, token_signer: TokenSigner) -> Self {
        let root_pem = loaded.chain_pem.last().cloned().unwrap_or_default();
        let token_verifier = token_signer.verifier();
        Self {
            issuer: loaded.issuer,
            issuer_not_after: loaded.not_after,
            chain_pem: loaded.chain_pem,
            root_pem,
            options,
            token_signer,
            token_verifier,
            rng: SystemRandom::new(),
        }
    }

    /// Installs an operator's CA into `dir` (Istio's "plug in CA certificates"): `chain_pem` holds the
    /// signing certificate first (a root, or an intermediate) and must end with the self-signed root;
    /// `key_pem` is the signing key. Validated before anything is written.
    pub fn import(
        dir: &Path,
        chain_file: &Path,
        key_file: &Path,
    ) -> Result<ImportOutcome, AuthorityError> {
        let chain_text = read(chain_file)?;
        let key_pem = read(key_file)?;
        validate_ca(chain_file, &chain_text, key_file, &key_pem)?;
        fs::create_dir_all(dir).map_err(|source| AuthorityError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let same = fs::read_to_string(dir.join(CHAIN_FILE)).ok().as_deref()
            == Some(chain_text.as_str())
            && fs::read_to_string(dir.join(KEY_FILE)).ok().as_deref() == Some(key_pem.as_str());
        if same {
            return Ok(ImportOutcome::Unchanged);
        }
        let replaced = dir.join(CHAIN_FILE).exists();
        // Key first: a crash between the two writes leaves a key that does not match the chain, which
        // the next start reports instead of silently using.
        write_atomic(&dir.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join(CHAIN_FILE), chain_text.as_bytes(), 0o644)?;
        Ok(if replaced {
            ImportOutcome::Replaced
        } else {
            ImportOutcome::Installed
        })
    }

    /// The trust domain of issued identities.
    pub fn trust_domain(&self) -> &str {
        &self.options.trust_domain
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// When the root certificate expires (`None` if its PEM does not parse, which loading checked).
    pub fn root_not_after(&self) -> Option<SystemTime> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.root_pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        Some(SystemTime::from(cert.validity().not_after.to_datetime()))
    }

    /// When the first certificate of the signing chain expires: no certificate is issued past it.
    pub fn chain_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// Verifies a bootstrap token and returns the SPIFFE ID it vouches for.
    pub fn authenticate(&self, token: &str, now: SystemTime) -> Result<SpiffeId, TokenError> {
        let TokenIdentity {
            namespace,
            service_account,
            ..
        } = self.token_verifier.verify(token, now)?;
        SpiffeId::new(&self.options.trust_domain, &namespace, &service_account)
            .map_err(|_| TokenError::Subject(format!("{namespace}:{service_account}")))
    }

    /// The verifier of the bootstrap tokens this CA issues (for `auth::weft`).
    pub fn token_verifier(&self) -> &TokenVerifier {
        &self.token_verifier
    }

    /// Issues a bootstrap token for a namespace/service account.
    pub fn issue_token(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
    ) -> Result<String, TokenError> {
        // Refuse to mint a token whose identity could never become a certificate.
        SpiffeId::new(&self.options.trust_domain, namespace, service_account).map_err(
            |reason| TokenError::InvalidIdentity {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
                reason,
            },
        )?;
        self.token_signer
            .issue(namespace, service_account, ttl, SystemTime::now())
    }

    /// Signs `csr_pem` for `identity` (from the caller's token). Returns the chain, leaf first, root
    /// last. `requested_secs` 0 means the default validity; above the maximum it is capped.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        requested_secs: i64,
        now: SystemTime,
    ) -> Result<Vec<String>, SignError> {
        let ttl = self.validity(requested_secs)?;
        let key = parse_csr(csr_pem, identity)?;
        crate::dns::check_dns_names(identity, &key.dns_names)?;
        self.issue(&key, identity, &key.dns_names, ttl, now)
    }

    /// Issues a certificate for a key the caller already holds (the CA's own serving identity).
    pub fn issue_for_key(
        &self,
        key: &KeyPair,
        identity: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<String>, SignError> {
        self.issue(key, identity, &[], ttl, now)
    }

    fn validity(&self, requested_secs: i64) -> Result<Duration, SignError> {
        if requested_secs < 0 {
            return Err(SignError::Validity(requested_secs, "must not be negative"));
        }
        let requested = Duration::from_secs(requested_secs.unsigned_abs());
        if requested > ABSURD_TTL {
            return Err(SignError::Validity(
                requested_secs,
                "more than 100 years (seconds expected)",
            ));
        }
        Ok(if requested.is_zero() {
            self.options.default_ttl.min(self.options.max_ttl)
        } else {
            requested.min(self.options.max_ttl)
        })
    }

    fn issue(
        &self,
        key: &impl PublicKeyData,
        identity: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<String>, SignError> {
        if now >= self.issuer_not_after {
            return Err(SignError::CaExpired);
        }
        // A leaf never outlives its issuer: verifiers would reject it at that point anyway.
        let not_after = (now + ttl).min(self.issuer_not_after);
        let mut params = CertificateParams::default();
        // Empty subject, identity only in the (then critical) URI SAN, as Istio issues them; DNS
        // SANs only as `crate::dns` allowed them (pilot's webhook Service names).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into()?)];
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = OffsetDateTime::from(now.checked_sub(BACKDATE).unwrap_or(now));
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(self.serial());
        let leaf = params.signed_by(key, &self.issuer)?;
        let mut chain = Vec::with_capacity(1 + self.chain_pem.len());
        chain.push(leaf.pem());
        chain.extend(self.chain_pem.iter().cloned());
        Ok(chain)
    }

    fn serial(&self) -> SerialNumber {
        let mut bytes = [0u8; 16];
        // The system RNG does not fail on Linux; if it ever did, a time-based serial still differs.
        if self.rng.fill(&mut bytes).is_err() {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(1);
            bytes = nanos.to_be_bytes();
        }
        // Positive and without a leading zero byte, as RFC 5280 wants.
        bytes[0] = (bytes[0] & 0x7f) | 0x01;
        SerialNumber::from_slice(&bytes)
    }
}

/// What [`Authority::import`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportOutcome {
    /// The data directory had no CA; the operator's is now installed.
    Installed,
    /// The data directory had another CA; it is replaced (workloads must get the new root).
    Replaced,
    /// The same CA was already installed.
    Unchanged,
}

/// The public key of a CSR, checked and ready to be certified.
struct CsrKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
    /// The DNS SANs asked for, still to be checked against the caller ([`crate::dns`]).
    dns_names: Vec<String>,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

/// Parses, verifies and vets a CSR; only its public key and DNS names are used (the identity comes
/// from the token; the DNS names are checked against it by the caller).
fn parse_csr(csr_pem: &str, identity: &SpiffeId) -> Result<CsrKey, SignError> {
    if csr_pem.len() > MAX_CSR_LEN {
        return Err(SignError::CsrTooLarge(csr_pem.len()));
    }
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|_| SignError::CsrPem)?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| SignError::CsrDer(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SignError::CsrDer("trailing bytes after the request".into()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let alg = key_algorithm(spki)?;
    csr.verify_signature()
        .map_err(|_| SignError::CsrSignature)?;
    let mut dns_names = Vec::new();
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    // URI SANs claim an identity; DNS SANs are returned for the DNS rule; other
                    // SANs (IP, e-mail) are ignored (never copied).
                    match name {
                        GeneralName::URI(uri) if *uri != identity.as_str() => {
                            return Err(SignError::IdentityMismatch {
                                requested: (*uri).to_owned(),
                                authenticated: identity.to_string(),
                            });
                        }
                        GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(CsrKey {
        raw: spki.subject_public_key.data.to_vec(),
        alg,
        dns_names,
    })
}

fn key_algorithm(
    spki: &SubjectPublicKeyInfo<'_>,
) -> Result<&'static SignatureAlgorithm, SignError> {
    let oid = spki.algorithm.algorithm.to_id_string();
    match oid.as_str() {
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                OID_P256 => Ok(&PKCS_ECDSA_P256_SHA256),
                OID_P384 => Ok(&PKCS_ECDSA_P384_SHA384),
                other => Err(SignError::KeyType(format!("EC curve {other}"))),
            }
        }
        OID_RSA => {
            let bits = match spki.parsed() {
                Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa.key_size(),
                _ => 0,
            };
            if (2048..=4096).contains(&bits) {
                Ok(&PKCS_RSA_SHA256)
            } else {
                Err(SignError::KeyType(format!("RSA {bits} bits")))
            }
        }
        other => Err(SignError::KeyType(format!("algorithm {other}"))),
    }
}

struct LoadedCa {
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
    chain_pem: Vec<String>,
}

/// Checks that `key_pem` matches the first certificate of `chain_text`, that it is a CA allowed to
/// sign, that each certificate is signed by the next, and that the chain ends with a self-signed root.
fn validate_ca(
    chain_path: &Path,
    chain_text: &str,
    key_path: &Path,
    key_pem: &str,
) -> Result<LoadedCa, AuthorityError> {
    let bad = |path: &Path, reason: String| AuthorityError::BadFile {
        path: path.to_owned(),
        reason,
    };
    let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(chain_path, format!("not PEM certificates: {e}")))?;
    if ders.is_empty() {
        return Err(bad(chain_path, "contains no certificate".into()));
    }
    let certs: Vec<X509Certificate<'_>> = ders
        .iter()
        .enumerate()
        .map(|(i, d)| {
            X509Certificate::from_der(d)
                .map(|(_, c)| c)
                .map_err(|e| bad(chain_path, format!("certificate {}: {e}", i + 1)))
        })
        .collect::<Result<_, _>>()?;
    let key = KeyPair::from_pem(key_pem)
        .map_err(|e| bad(key_path, format!("not a usable private key: {e}")))?;
    let signing = &certs[0];
    if signing.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad(
            key_path,
            format!(
                "key does not match the first certificate of {}",
                chain_path.display()
            ),
        ));
    }
    let is_ca = signing
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    let can_sign = signing
        .key_usage()
        .ok()
        .flatten()
        .is_none_or(|ku| ku.value.key_cert_sign());
    if !is_ca || !can_sign {
        return Err(bad(
            chain_path,
            "first certificate is not a CA allowed to sign certificates (needs CA:TRUE and keyCertSign)"
                .into(),
        ));
    }
    for (i, pair) in certs.windows(2).enumerate() {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .map_err(|_| {
                bad(
                    chain_path,
                    format!(
                        "certificate {} is not signed by certificate {}",
                        i + 1,
                        i + 2
                    ),
                )
            })?;
    }
    let root = &certs[certs.len() - 1];
    if root.subject() != root.issuer() || root.verify_signature(None).is_err() {
        return Err(bad(
            chain_path,
            "the last certificate must be the self-signed root".into(),
        ));
    }
    let not_after = certs
        .iter()
        .map(|c| SystemTime::from(c.validity().not_after.to_datetime()))
        .min()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let issuer = Issuer::from_ca_cert_der(&ders[0], key)
        .map_err(|e| bad(chain_path, format!("first certificate: {e}")))?;
    let chain_pem = ders.iter().map(|d| to_pem(d)).collect();
    Ok(LoadedCa {
        issuer,
        not_after,
        chain_pem,
    })
}

fn create_root(dir: &Path, trust_domain: &str) -> Result<(), AuthorityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "weft root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now.checked_sub(BACKDATE).unwrap_or(now));
    params.not_after = OffsetDateTime::from(now + ROOT_TTL);
    let cert = params.self_signed(&key)?;
    write_atomic(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.join(CHAIN_FILE), cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn to_pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The token key in `dir`, created on first use.
fn load_or_create_token_key(dir: &Path) -> Result<TokenSigner, AuthorityError> {
    let token_path = dir.join(TOKEN_KEY_FILE);
    if !token_path.exists() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        write_atomic(&token_path, key.serialize_pem().as_bytes(), 0o600)?;
    }
    let token_pem = read(&token_path)?;
    let token_der =
        rustls_pki_types::PrivateKeyDer::from_pem_slice(token_pem.as_bytes()).map_err(|e| {
            AuthorityError::BadFile {
                path: token_path.clone(),
                reason: format!("not a PEM private key: {e}"),
            }
        })?;
    Ok(TokenSigner::from_pkcs8(token_der.secret_der())?)
}

const NO_CERTIFICATE: &str = "contains no certificate";

/// The PEM certificates of `path`; none is an error.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let text = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| AuthorityError::BadFile {
            path: path.to_owned(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(AuthorityError::BadFile {
            path: path.to_owned(),
            reason: NO_CERTIFICATE.into(),
        });
    }
    Ok(certs)
}

fn read(path: &Path) -> Result<String, AuthorityError> {
    fs::read_to_string(path).map_err(|source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `data` to `path` atomically with the given mode: temp file, fsync, rename, fsync directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), AuthorityError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| AuthorityError::Io { path: p, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

#[cfg(test)]
pub(crate) mod tests;
