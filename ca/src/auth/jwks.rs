//! `--auth jwks`: Kubernetes service-account tokens checked offline, against the keys of the
//! cluster's service-account issuer (the JWKS the API server serves at `/openid/v1/jwks`), mounted
//! as a file. No API call per CSR.
//!
//! Checked, in order: size, form, header (`alg` RS256 or ES256 only: `none`, HS* and anything else
//! refused; a `crit` header refused), key by `kid`, signature, `iss`, `aud` (string or array),
//! `exp` (required), `nbf`, `iat` (with [`LEEWAY`]), then `sub` = `system:serviceaccount:NS:SA`
//! agreeing with the `kubernetes.io` claims (namespace, serviceaccount.name; pod.name and pod.uid
//! when the token is bound to a pod).
//!
//! What it cannot do: see that the pod a token is bound to has been deleted (only the API server
//! knows; `--auth kubernetes` asks it). Such a token stays usable until it expires, which bounds
//! the window: projected tokens live about an hour (`expirationSeconds`, kubelet-rotated).
//!
//! Crypto is `ring`, already the workspace's: RSA from the JWK's n/e, P-256 from x/y. jsonwebtoken
//! 12 would do the JWT part but pulls a second crypto stack (aws-lc-rs or RustCrypto) into a CA
//! that is otherwise ring only; the part it would save is the small parser below, which is fuzzed.
//!
//! The JWKS file is polled ([`JWKS_POLL_INTERVAL`]) like the workload's root file (`crate::files`),
//! and read again at once (at most once a second) when a token names a key id it does not hold:
//! keys rotate, and a new token may arrive before the next poll.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

pub use crate::token::{LEEWAY, MAX_TOKEN_LEN};

/// Largest JWKS file accepted (a cluster's has one or two keys, under 2 KiB).
pub const MAX_JWKS_LEN: usize = 64 * 1024;
/// Most keys a JWKS may hold.
pub const MAX_KEYS: usize = 64;
/// How often the JWKS file is checked for changes.
pub const JWKS_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Forced re-reads on an unknown key id are at most this frequent (a flood of made-up key ids must
/// not become a flood of file reads).
const FORCED_RELOAD_MIN_GAP: Duration = Duration::from_secs(1);

/// Why a JWKS could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file could not be read.
    #[error("cannot read JWKS {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Bigger than [`MAX_JWKS_LEN`].
    #[error("JWKS is {0} bytes; at most 65536 are accepted")]
    TooLarge(usize),
    /// Not a JWKS document.
    #[error("JWKS is not a JSON {{\"keys\": [...]}} document: {0}")]
    Json(String),
    /// More than [`MAX_KEYS`] keys.
    #[error("JWKS has {0} keys; at most 64 are accepted")]
    TooManyKeys(usize),
    /// No key is usable.
    #[error("JWKS has no usable RS256 or ES256 signing key ({0})")]
    NoUsableKey(String),
}

/// Why a token was refused by the offline check. Each message says what the caller can fix.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// Bigger than [`MAX_TOKEN_LEN`].
    #[error("token is {0} bytes; at most 8192 are accepted")]
    TooLarge(usize),
    /// Not a compact JWS with JSON header and claims.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// `alg` is not RS256 or ES256.
    #[error("token algorithm {0:?} is not accepted; service-account tokens are RS256 or ES256")]
    Algorithm(String),
    /// The header has a `crit` parameter (extensions this verifier does not implement).
    #[error("token header has critical extensions this CA does not understand")]
    Critical,
    /// No key with the token's `kid`.
    #[error(
        "token key id {0:?} is not among the service-account issuer's keys (a token from another cluster, or the --jwks file is stale)"
    )]
    UnknownKeyId(String),
    /// The token has no `kid` and the JWKS has more than one key for its algorithm.
    #[error("token has no key id and the JWKS holds several keys for {0}")]
    NoKeyId(&'static str),
    /// The key with that `kid` is of another type than `alg`.
    #[error("token algorithm {alg} does not match key {kid:?}")]
    KeyMismatch {
        /// The token's algorithm.
        alg: &'static str,
        /// The key's id.
        kid: String,
    },
    /// The signature does not verify.
    #[error("token signature does not verify against the service-account issuer's key")]
    Signature,
    /// `iss` is not the configured issuer.
    #[error("token issuer {got:?} is not the cluster's service-account issuer {want:?}")]
    Issuer {
        /// The token's issuer.
        got: String,
        /// `--token-issuer`.
        want: String,
    },
    /// `aud` does not contain the CA's audience.
    #[error(
        "token audience {got:?} does not include {want:?}; mount a projected token with audience {want:?}"
    )]
    Audience {
        /// The token's audiences.
        got: Vec<String>,
        /// `--token-audience`.
        want: String,
    },
    /// No `exp` (a legacy, non-expiring secret token).
    #[error("token has no expiry (a legacy secret token); use a projected service-account token")]
    NoExpiry,
    /// Past `exp`.
    #[error("token expired {0} s ago; the kubelet should have refreshed it, read the file again")]
    Expired(u64),
    /// Before `nbf`.
    #[error("token is not valid for another {0} s (clock skew between node and CA?)")]
    NotYetValid(u64),
    /// `iat` in the future.
    #[error("token is issued {0} s in the future (clock skew between node and CA?)")]
    IssuedInFuture(u64),
    /// `sub` is not a service account.
    #[error("token subject {0:?} is not system:serviceaccount:<namespace>:<name>")]
    Subject(String),
    /// The `kubernetes.io` claims are missing or disagree with `sub`.
    #[error("token's kubernetes.io claims {0}")]
    KubernetesClaims(String),
}

/// A verification key from the JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyMaterial {
    /// RSA modulus and exponent, big-endian, no leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// An uncompressed P-256 point (0x04 || x || y).
    P256(Vec<u8>),
}

impl KeyMaterial {
    fn alg(&self) -> &'static str {
        match self {
            Self::Rsa { .. } => "RS256",
            Self::P256(_) => "ES256",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    kid: Option<String>,
    material: KeyMaterial,
}

/// A parsed JWKS: the usable signing keys (others are skipped, with the reason kept for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Key>,
    skipped: Vec<String>,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

fn b64(field: Option<&String>, name: &str) -> Result<Vec<u8>, String> {
    let text = field.ok_or_else(|| format!("no {name}"))?;
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| format!("{name} is not base64url"))
}

fn strip_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|&&b| b == 0).count();
    v.drain(..zeros);
    v
}

impl RawJwk {
    fn material(&self) -> Result<KeyMaterial, String> {
        if self.use_.as_deref().is_some_and(|u| u != "sig") {
            return Err("not a signing key".into());
        }
        let material = match (self.kty.as_str(), self.crv.as_deref()) {
            ("RSA", _) => {
                let n = strip_zeros(b64(self.n.as_ref(), "n")?);
                let e = strip_zeros(b64(self.e.as_ref(), "e")?);
                // ring verifies 2048..=8192-bit moduli; checked here so a bad key is reported at load.
                if !(256..=1024).contains(&n.len()) {
                    return Err(format!("RSA modulus of {} bits", n.len() * 8));
                }
                if e.is_empty() || e.len() > 4 {
                    return Err("RSA exponent out of range".into());
                }
                KeyMaterial::Rsa { n, e }
            }
            ("EC", Some("P-256")) => {
                let x = b64(self.x.as_ref(), "x")?;
                let y = b64(self.y.as_ref(), "y")?;
                if x.len() != 32 || y.len() != 32 {
                    return Err("P-256 coordinates must be 32 bytes".into());
                }
                let mut point = Vec::with_capacity(65);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                KeyMaterial::P256(point)
            }
            (kty, crv) => return Err(format!("key type {kty} {}", crv.unwrap_or(""))),
        };
        if let Some(alg) = &self.alg
            && alg != material.alg()
        {
            return Err(format!("alg {alg} on a {} key", material.alg()));
        }
        Ok(material)
    }
}

impl Jwks {
    /// Parses a JWKS document. Keys of other types (or unusable ones) are skipped; none usable is an
    /// error, so a bad file never replaces good keys.
    pub fn parse(bytes: &[u8]) -> Result<Self, JwksError> {
        if bytes.len() > MAX_JWKS_LEN {
            return Err(JwksError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| JwksError::Json("not UTF-8".into()))?;
        let raw: RawJwks =
            serde_json::from_str(text).map_err(|e| JwksError::Json(e.to_string()))?;
        if raw.keys.len() > MAX_KEYS {
            return Err(JwksError::TooManyKeys(raw.keys.len()));
        }
        let mut keys = Vec::with_capacity(raw.keys.len());
        let mut skipped = Vec::new();
        for jwk in &raw.keys {
            match jwk.material() {
                Ok(material) => keys.push(Key {
                    kid: jwk.kid.clone(),
                    material,
                }),
                Err(why) => {
                    skipped.push(format!("key {:?}: {why}", jwk.kid.as_deref().unwrap_or("")))
                }
            }
        }
        if keys.is_empty() {
            let why = if skipped.is_empty() {
                "the key set is empty".to_owned()
            } else {
                skipped.join("; ")
            };
            return Err(JwksError::NoUsableKey(why));
        }
        Ok(Self { keys, skipped })
    }

    /// How many usable keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds no key (never true for a parsed JWKS).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Why keys were skipped (for the log at load).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    fn key_for(&self, alg: &'static str, kid: Option<&str>) -> Result<&KeyMaterial, JwtError> {
        let key = match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| JwtError::UnknownKeyId(kid.to_owned()))?,
            None => {
                let mut same_alg = self.keys.iter().filter(|k| k.material.alg() == alg);
                match (same_alg.next(), same_alg.next()) {
                    (Some(only), None) => only,
                    (None, _) => return Err(JwtError::UnknownKeyId(String::new())),
                    (Some(_), Some(_)) => return Err(JwtError::NoKeyId(alg)),
                }
            }
        };
        if key.material.alg() != alg {
            return Err(JwtError::KeyMismatch {
                alg,
                kid: key.kid.clone().unwrap_or_default(),
            });
        }
        Ok(&key.material)
    }
}

/// What the token must say besides being signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// `iss`: the cluster's service-account issuer (`--token-issuer`).
    pub issuer: String,
    /// An `aud` entry (`--token-audience`).
    pub audience: String,
}

/// The identity a verified token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// The pod the token is bound to, if any.
    pub pod: Option<String>,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    serviceaccount: Option<ObjectRef>,
    pod: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ObjectRef {
    name: Option<String>,
    uid: Option<String>,
}

fn decode_json<T: for<'de> Deserialize<'de>>(
    part: &str,
    not_b64: &'static str,
    not_json: &'static str,
) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed(not_b64))?;
    // serde_json skips unknown fields without checking their UTF-8 (see the weft token's fuzz find).
    let text = std::str::from_utf8(&bytes).map_err(|_| JwtError::Malformed("not UTF-8 JSON"))?;
    serde_json::from_str(text).map_err(|_| JwtError::Malformed(not_json))
}

/// Verifies `token` against `jwks` and `expected` as of `now` (see the module docs for the checks).
pub fn verify(
    jwks: &Jwks,
    token: &str,
    expected: &Expected,
    now: SystemTime,
) -> Result<VerifiedToken, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLarge(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    let header: Header = decode_json(h, "header is not base64url", "header is not a JWS header")?;
    let alg = match header.alg.as_str() {
        "RS256" => "RS256",
        "ES256" => "ES256",
        _ => return Err(JwtError::Algorithm(header.alg)),
    };
    if header.crit.is_some() {
        return Err(JwtError::Critical);
    }
    let key = jwks.key_for(alg, header.kid.as_deref())?;
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtError::Malformed("signature is not base64url"))?;
    let signed = &token.as_bytes()[..h.len() + 1 + c.len()];
    let verified = match key {
        KeyMaterial::Rsa { n, e } => RsaPublicKeyComponents { n, e }.verify(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            signed,
            &sig,
        ),
        KeyMaterial::P256(point) => {
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point).verify(signed, &sig)
        }
    };
    verified.map_err(|_| JwtError::Signature)?;

    let claims: Claims = decode_json(c, "claims are not base64url", "claims are not a JWT")?;
    let iss = claims.iss.unwrap_or_default();
    if iss != expected.issuer {
        return Err(JwtError::Issuer {
            got: iss,
            want: expected.issuer.clone(),
        });
    }
    let auds = match claims.aud {
        Some(Audience::One(a)) => vec![a],
        Some(Audience::Many(a)) => a,
        None => Vec::new(),
    };
    if !auds.contains(&expected.audience) {
        return Err(JwtError::Audience {
            got: auds,
            want: expected.audience.clone(),
        });
    }
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let leeway = LEEWAY.as_secs();
    let exp = claims.exp.ok_or(JwtError::NoExpiry)?;
    if now > exp.saturating_add(leeway) {
        return Err(JwtError::Expired(now - exp));
    }
    if let Some(nbf) = claims.nbf
        && nbf > now.saturating_add(leeway)
    {
        return Err(JwtError::NotYetValid(nbf - now));
    }
    if let Some(iat) = claims.iat
        && iat > now.saturating_add(leeway)
    {
        return Err(JwtError::IssuedInFuture(iat - now));
    }
    let sub = claims.sub.unwrap_or_default();
    let (namespace, service_account) =
        super::parse_service_account(&sub).ok_or_else(|| JwtError::Subject(sub.clone()))?;
    let k8s = claims
        .kubernetes
        .ok_or_else(|| JwtError::KubernetesClaims("are missing".into()))?;
    if k8s.namespace.as_deref() != Some(namespace) {
        return Err(JwtError::KubernetesClaims(format!(
            "name namespace {:?}, the subject {namespace:?}",
            k8s.namespace.unwrap_or_default()
        )));
    }
    let sa_name = k8s.serviceaccount.and_then(|sa| sa.name);
    if sa_name.as_deref() != Some(service_account) {
        return Err(JwtError::KubernetesClaims(format!(
            "name service account {:?}, the subject {service_account:?}",
            sa_name.unwrap_or_default()
        )));
    }
    let pod = match k8s.pod {
        None => None,
        Some(ObjectRef {
            name: Some(name),
            uid: Some(uid),
        }) if !name.is_empty() && !uid.is_empty() => Some(name),
        Some(_) => {
            return Err(JwtError::KubernetesClaims(
                "bind the token to a pod without its name and uid".into(),
            ));
        }
    };
    Ok(VerifiedToken {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod,
        expires_at: exp,
    })
}

/// The `--jwks` file and the keys last loaded from it; clones share them.
#[derive(Debug, Clone)]
pub struct JwksFile {
    inner: Arc<FileInner>,
}

#[derive(Debug)]
struct FileInner {
    path: PathBuf,
    keys: ArcSwap<Jwks>,
    last_forced: Mutex<Option<Instant>>,
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, JwksError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| JwksError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut bytes = Vec::new();
    // One byte over the limit is enough to refuse it; a huge file is never read whole.
    file.take(MAX_JWKS_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| JwksError::Read {
            path: path.to_owned(),
            source,
        })?;
    Ok(bytes)
}

impl JwksFile {
    /// Loads `path`; at start-up an unreadable file or one without a usable key is an error.
    pub fn load(path: &Path) -> Result<Self, JwksError> {
        let jwks = Jwks::parse(&read_bounded(path)?)?;
        for why in jwks.skipped() {
            tracing::warn!(path = %path.display(), "JWKS key skipped: {why}");
        }
        Ok(Self {
            inner: Arc::new(FileInner {
                path: path.to_owned(),
                keys: ArcSwap::from_pointee(jwks),
                last_forced: Mutex::new(None),
            }),
        })
    }

    /// The keys in force.
    pub fn keys(&self) -> Arc<Jwks> {
        self.inner.keys.load_full()
    }

    /// Reads the file again and swaps the keys if they changed; returns whether they did. A file
    /// that cannot be read or holds no usable key leaves the current keys in force, with a warning
    /// (a bad write must not lock every workload out).
    pub async fn reload(&self) -> bool {
        let path = self.inner.path.clone();
        let read = tokio::task::spawn_blocking(move || read_bounded(&path)).await;
        let parsed = match read {
            Ok(Ok(bytes)) => Jwks::parse(&bytes),
            Ok(Err(e)) => Err(e),
            Err(join) => Err(JwksError::Json(format!("reader task failed: {join}"))),
        };
        match parsed {
            Ok(jwks) if *self.inner.keys.load_full() == jwks => false,
            Ok(jwks) => {
                tracing::info!(path = %self.inner.path.display(), keys = jwks.len(), "JWKS reloaded");
                self.inner.keys.store(Arc::new(jwks));
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS not reloaded; keeping the current keys");
                false
            }
        }
    }

    /// Reloads now unless a forced reload happened within [`FORCED_RELOAD_MIN_GAP`].
    async fn reload_on_unknown_key(&self) -> bool {
        {
            let Ok(mut last) = self.inner.last_forced.lock() else {
                return false;
            };
            let now = Instant::now();
            if last.is_some_and(|t| now.duration_since(t) < FORCED_RELOAD_MIN_GAP) {
                return false;
            }
            *last = Some(now);
        }
        self.reload().await
    }

    /// Polls the file every `every` for ever. Run it as a task; it ends when the task is dropped.
    pub async fn watch(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.reload().await;
        }
    }
}

/// `--auth jwks`: the keys file and what tokens must say.
#[derive(Debug, Clone)]
pub struct JwksAuthenticator {
    file: JwksFile,
    expected: Expected,
}

impl JwksAuthenticator {
    /// Checks tokens against the keys of `file`.
    pub fn new(file: JwksFile, expected: Expected) -> Self {
        Self { file, expected }
    }

    /// The file (to spawn its [`JwksFile::watch`]).
    pub fn file(&self) -> &JwksFile {
        &self.file
    }

    /// The namespace and service account `token` proves.
    pub async fn authenticate(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(String, String), JwtError> {
        let verified = match verify(&self.file.keys(), token, &self.expected, now) {
            Err(JwtError::UnknownKeyId(_)) if self.file.reload_on_unknown_key().await => {
                verify(&self.file.keys(), token, &self.expected, now)
            }
            other => other,
        }?;
        Ok((verified.namespace, verified.service_account))
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod testkeys;

#[cfg(test)]
mod tests;
