//! The CA's counters, with Istio's names (istiod's `security/pkg/server/ca/monitoring.go`), owned by
//! [`super::CaService`] and rendered by `ca serve --monitoring-listen`.
//!
//! Istio's families are kept as they are, including their names without `_total` (see
//! [`crate::monitoring`]). Where Istio counts a failure without saying why, weft adds a `reason`
//! label (a sum over it is Istio's number, so Istio's dashboards and alerts still work):
//! - `citadel_server_authentication_failure_count{reason}`: `missing_token`, `invalid_token`,
//!   `unavailable` (the TokenReview could not be made), `ca_misconfigured` (the API server refused
//!   the CA's TokenReview), `bad_identity` (the token's service account is no SPIFFE ID),
//!   `impersonation`.
//! - `citadel_server_csr_parsing_err_count{reason}`: `too_large`, `not_pem`, `unparsable`,
//!   `bad_signature`, `key_type`.
//! - `citadel_server_id_extraction_err_count{reason}`: the CSR names an identity the caller does not
//!   have: `identity_mismatch` (URI SAN), `dns_name` (a DNS SAN it may not have).
//! - `citadel_server_csr_sign_err_count{error}` keeps Istio's label and its values where they mean
//!   the same (`TTL_ERROR`, `CERT_GEN_ERROR`); `CA_EXPIRED` is weft's (the signing certificate has
//!   expired).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::CaError;
use crate::authority::{Authority, SignError};
use crate::monitoring::{Exposition, Kind};

/// What the CA counts; see the module docs for the names.
#[derive(Debug)]
pub struct CaMetrics {
    csr: AtomicU64,
    issued: AtomicU64,
    /// (family, label value) -> failures.
    failures: Mutex<BTreeMap<(Failure, &'static str), u64>>,
    root_not_after: Option<SystemTime>,
    chain_not_after: SystemTime,
}

/// The failure families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    Authentication,
    CsrParsing,
    IdExtraction,
    Sign,
}

impl Failure {
    const ALL: [Failure; 4] = [
        Failure::Authentication,
        Failure::CsrParsing,
        Failure::IdExtraction,
        Failure::Sign,
    ];

    /// Name, label, help.
    fn family(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Failure::Authentication => (
                "citadel_server_authentication_failure_count",
                "reason",
                "The number of authentication failures.",
            ),
            Failure::CsrParsing => (
                "citadel_server_csr_parsing_err_count",
                "reason",
                "The number of errors occurred when parsing the CSR.",
            ),
            Failure::IdExtraction => (
                "citadel_server_id_extraction_err_count",
                "reason",
                "The number of errors occurred when extracting the ID from CSR.",
            ),
            Failure::Sign => (
                "citadel_server_csr_sign_err_count",
                "error",
                "The number of errors occurred when signing the CSR.",
            ),
        }
    }
}

/// The family and label value a refusal is counted under.
fn classify(error: &CaError) -> (Failure, &'static str) {
    match error {
        CaError::MissingToken => (Failure::Authentication, "missing_token"),
        CaError::Impersonation => (Failure::Authentication, "impersonation"),
        CaError::Auth(e) if e.is_unavailable() => (Failure::Authentication, "unavailable"),
        CaError::Auth(e) if e.is_ca_misconfigured() => {
            (Failure::Authentication, "ca_misconfigured")
        }
        CaError::Auth(crate::auth::AuthError::Identity { .. }) => {
            (Failure::Authentication, "bad_identity")
        }
        CaError::Auth(_) => (Failure::Authentication, "invalid_token"),
        CaError::Sign(e) => match e {
            SignError::CsrTooLarge(_) => (Failure::CsrParsing, "too_large"),
            SignError::CsrPem => (Failure::CsrParsing, "not_pem"),
            SignError::CsrDer(_) => (Failure::CsrParsing, "unparsable"),
            SignError::CsrSignature => (Failure::CsrParsing, "bad_signature"),
            SignError::KeyType(_) => (Failure::CsrParsing, "key_type"),
            SignError::IdentityMismatch { .. } => (Failure::IdExtraction, "identity_mismatch"),
            SignError::DnsName(_) => (Failure::IdExtraction, "dns_name"),
            SignError::Validity(..) => (Failure::Sign, "TTL_ERROR"),
            SignError::CaExpired => (Failure::Sign, "CA_EXPIRED"),
            SignError::Sign(_) => (Failure::Sign, "CERT_GEN_ERROR"),
        },
    }
}

impl CaMetrics {
    /// Counters at zero for the CA signing with `authority` (its expiry times are exported).
    pub fn new(authority: &Authority) -> Self {
        Self {
            csr: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            failures: Mutex::default(),
            root_not_after: authority.root_not_after(),
            chain_not_after: authority.chain_not_after(),
        }
    }

    /// Counts a `CreateCertificate` request received.
    pub(super) fn request(&self) {
        self.csr.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts the outcome of a request.
    pub(super) fn outcome(&self, result: Result<(), &CaError>) {
        match result {
            Ok(()) => {
                self.issued.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                let key = classify(error);
                let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
                *failures.entry(key).or_default() += 1;
            }
        }
    }

    /// Requests received so far (`citadel_server_csr_count`).
    pub fn requests(&self) -> u64 {
        self.csr.load(Ordering::Relaxed)
    }

    /// Certificates issued so far.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Authentication failures so far, all reasons.
    pub fn authentication_failures(&self) -> u64 {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures
            .iter()
            .filter(|((f, _), _)| *f == Failure::Authentication)
            .map(|(_, n)| n)
            .sum()
    }

    /// The Prometheus text of every family, at `now`.
    pub fn render(&self, now: SystemTime) -> String {
        let mut out = Exposition::default();
        for (name, help, value) in [
            (
                "citadel_server_csr_count",
                "The number of CSRs received by Citadel server.",
                self.requests(),
            ),
            (
                "citadel_server_success_cert_issuance_count",
                "The number of certificates issuances that have succeeded.",
                self.issued(),
            ),
        ] {
            out.family(name, Kind::Counter, help)
                .sample(name, &[], value as f64);
        }
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for family in Failure::ALL {
            let (name, label, help) = family.family();
            out.family(name, Kind::Counter, help);
            for ((_, value), n) in failures.iter().filter(|((f, _), _)| *f == family) {
                out.sample(name, &[(label, value)], *n as f64);
            }
        }
        let unix = |t: SystemTime| match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_secs_f64().floor(),
            Err(e) => -e.duration().as_secs_f64().floor(),
        };
        let remaining = |t: SystemTime| match t.duration_since(now) {
            Ok(d) => d.as_secs_f64().floor(),
            Err(e) => -e.duration().as_secs_f64().floor(),
        };
        for (what, subject, not_after) in [
            ("root_cert", "Citadel root cert", self.root_not_after),
            (
                "cert_chain",
                "Citadel cert chain",
                Some(self.chain_not_after),
            ),
        ] {
            let Some(not_after) = not_after else { continue };
            let name = format!("citadel_server_{what}_expiry_timestamp");
            out.family(
                &name,
                Kind::Gauge,
                &format!("The unix timestamp, in seconds, when {subject} will expire."),
            )
            .sample(&name, &[], unix(not_after));
            let name = format!("citadel_server_{what}_expiry_seconds");
            out.family(
                &name,
                Kind::Gauge,
                &format!(
                    "The time remaining, in seconds, before {subject} will expire. \
                     A negative value indicates the cert is expired."
                ),
            )
            .sample(&name, &[], remaining(not_after));
        }
        out.finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::authority::AuthorityOptions;

    #[test]
    fn counts_requests_issuances_and_failures_by_reason_with_istio_names() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_create(dir.path(), AuthorityOptions::default()).unwrap();
        let m = CaMetrics::new(&authority);
        for _ in 0..3 {
            m.request();
        }
        m.outcome(Ok(()));
        m.outcome(Err(&CaError::MissingToken));
        m.outcome(Err(&CaError::Sign(SignError::CsrPem)));
        let now = SystemTime::now();
        let text = m.render(now);
        for line in [
            "# TYPE citadel_server_csr_count counter\ncitadel_server_csr_count 3\n",
            "citadel_server_success_cert_issuance_count 1\n",
            "citadel_server_authentication_failure_count{reason=\"missing_token\"} 1\n",
            "citadel_server_csr_parsing_err_count{reason=\"not_pem\"} 1\n",
            "# TYPE citadel_server_csr_sign_err_count counter\n",
            "# TYPE citadel_server_root_cert_expiry_timestamp gauge\n",
            "# TYPE citadel_server_cert_chain_expiry_seconds gauge\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        assert_eq!(m.authentication_failures(), 1);
        // The self-signed root is the chain: both expire together, years from now.
        let root = authority.root_not_after().unwrap();
        assert_eq!(root, authority.chain_not_after());
        let ts = root
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(text.contains(&format!("citadel_server_root_cert_expiry_timestamp {ts}\n")));
        let left = root.duration_since(now).unwrap().as_secs();
        assert!(left > 365 * 24 * 3600, "{left}");
        assert!(text.contains(&format!("citadel_server_root_cert_expiry_seconds {left}\n")));
    }
}
