//! SPIFFE IDs of the Istio shape `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing follows the SPIFFE ID standard (SPIFFE-ID.md §2) strictly, because a lenient parser is how
//! type- and prefix-confusion bugs get in (Envoy CVE-2022-21656): lowercase trust domain of
//! `[a-z0-9._-]`, no port, userinfo, query, fragment or percent-encoding, path segments of
//! `[A-Za-z0-9._-]` that are neither empty nor `.`/`..`, at most 2048 bytes in all. On top of the
//! standard, weft requires the workload path `ns/<ns>/sa/<sa>`, as Istio does.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID the standard allows, in bytes.
pub const MAX_LEN: usize = 2048;
const SCHEME: &str = "spiffe://";

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    // Byte ranges into `uri`, so accessors are free and the ID is one allocation.
    td_end: usize,
    ns: (usize, usize),
    sa_start: usize,
}

/// Why a string is not an acceptable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// Empty input.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// Longer than [`MAX_LEN`].
    #[error("SPIFFE ID is {0} bytes long; at most 2048 are allowed")]
    TooLong(usize),
    /// Does not start with `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    Scheme,
    /// Trust domain missing.
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    /// Trust domain contains a character outside `[a-z0-9._-]` (uppercase, port, userinfo...).
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores (found {found:?})"
    )]
    TrustDomainChar {
        /// The offending character.
        found: char,
    },
    /// `spiffe://td` or `spiffe://td/`: a workload ID needs a path.
    #[error("SPIFFE ID has no path; a workload ID needs /ns/<namespace>/sa/<service-account>")]
    MissingPath,
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("SPIFFE ID path has an empty segment")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("SPIFFE ID path has a dot segment")]
    DotSegment,
    /// A path character outside `[A-Za-z0-9._-]` (query, fragment, percent-encoding...).
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores (found {found:?})"
    )]
    PathChar {
        /// The offending character.
        found: char,
    },
    /// Valid SPIFFE, but not the workload shape `ns/<ns>/sa/<sa>`.
    #[error("SPIFFE ID path must be /ns/<namespace>/sa/<service-account>, got {path:?}")]
    NotWorkloadPath {
        /// The path that was found.
        path: String,
    },
}

impl SpiffeId {
    /// Builds the ID of a workload, validating each part as [`SpiffeId::parse`] would.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// Parses and validates a SPIFFE ID of the workload shape.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if let Some(found) = td.chars().find(|c| !is_td_char(*c)) {
            return Err(SpiffeIdError::TrustDomainChar { found });
        }
        if path.is_empty() || path == "/" {
            return Err(SpiffeIdError::MissingPath);
        }
        // Skip the leading '/', then check each segment.
        let segments: Vec<&str> = path[1..].split('/').collect();
        for seg in &segments {
            if seg.is_empty() {
                return Err(SpiffeIdError::EmptySegment);
            }
            if *seg == "." || *seg == ".." {
                return Err(SpiffeIdError::DotSegment);
            }
            if let Some(found) = seg.chars().find(|c| !is_path_char(*c)) {
                return Err(SpiffeIdError::PathChar { found });
            }
        }
        match segments.as_slice() {
            ["ns", ns, "sa", sa] => {
                let td_end = SCHEME.len() + td.len();
                let ns_start = td_end + "/ns/".len();
                let ns_end = ns_start + ns.len();
                let sa_start = ns_end + "/sa/".len();
                debug_assert_eq!(&s[sa_start..], *sa);
                Ok(SpiffeId {
                    uri: s.to_owned(),
                    td_end,
                    ns: (ns_start, ns_end),
                    sa_start,
                })
            }
            _ => Err(SpiffeIdError::NotWorkloadPath {
                path: path.to_owned(),
            }),
        }
    }

    /// The whole ID as a URI string.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[self.ns.0..self.ns.1]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[self.sa_start..]
    }
}

fn is_td_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/sleep").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(
            SpiffeId::new("cluster.local", "default", "sleep").unwrap(),
            id
        );
    }

    #[test]
    fn rejects_what_the_standard_rejects() {
        use SpiffeIdError::*;
        let long = format!("spiffe://td/ns/a/sa/{}", "x".repeat(2100));
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("http://td/ns/a/sa/b", Scheme),
            ("SPIFFE://td/ns/a/sa/b", Scheme),
            ("spiffe:///ns/a/sa/b", MissingTrustDomain),
            ("spiffe://td", MissingPath),
            ("spiffe://td/", MissingPath),
            ("spiffe://TD/ns/a/sa/b", TrustDomainChar { found: 'T' }),
            ("spiffe://td:443/ns/a/sa/b", TrustDomainChar { found: ':' }),
            ("spiffe://u@td/ns/a/sa/b", TrustDomainChar { found: '@' }),
            ("spiffe://td/ns/a/sa/b?q", PathChar { found: '?' }),
            ("spiffe://td/ns/a/sa/b#f", PathChar { found: '#' }),
            ("spiffe://td/ns/a/sa/b%41", PathChar { found: '%' }),
            ("spiffe://td/ns/a/sa/b/", EmptySegment),
            ("spiffe://td/ns//sa/b", EmptySegment),
            ("spiffe://td/ns/../sa/b", DotSegment),
            ("spiffe://td/ns/./sa/b", DotSegment),
            (
                "spiffe://td/workload",
                NotWorkloadPath {
                    path: "/workload".into(),
                },
            ),
            (
                "spiffe://td/ns/a/sa/b/c",
                NotWorkloadPath {
                    path: "/ns/a/sa/b/c".into(),
                },
            ),
            (&long, TooLong(long.len())),
        ];
        for (input, want) in cases {
            assert_eq!(
                SpiffeId::parse(input).as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn error_messages_read_well() {
        let err = SpiffeId::parse("spiffe://Cluster.local/ns/a/sa/b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores (found 'C')"
        );
    }

    proptest! {
        #[test]
        fn round_trips(td in "[a-z0-9._-]{1,40}", ns in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,30}", sa in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,30}") {
            prop_assume!(ns != "." && ns != ".." && sa != "." && sa != "..");
            let id = SpiffeId::new(&td, &ns, &sa).unwrap();
            let again = SpiffeId::parse(&id.to_string()).unwrap();
            prop_assert_eq!(again.trust_domain(), td.as_str());
            prop_assert_eq!(again.namespace(), ns.as_str());
            prop_assert_eq!(again.service_account(), sa.as_str());
            prop_assert_eq!(&again, &id);
        }

        #[test]
        fn never_panics_and_only_accepts_canonical_text(s in "\\PC{0,80}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert!(id.trust_domain().chars().all(is_td_char));
            }
        }

        #[test]
        fn rejects_any_bad_trust_domain_char(prefix in "[a-z]{0,5}", bad in "[A-Z:@/?#%!]", suffix in "[a-z]{0,5}") {
            let td = format!("{prefix}{bad}{suffix}");
            prop_assert!(SpiffeId::new(&td, "ns", "sa").is_err());
        }
    }
}
