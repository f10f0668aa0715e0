//! DNS names in certificates: which callers may have them, and which names.
//!
//! A workload certificate names only the SPIFFE identity of the caller's token; DNS SANs in a CSR
//! were always ignored. One caller needs them: pilot's admission webhooks are called by the
//! Kubernetes API server, which knows nothing of SPIFFE and checks the serving certificate against
//! the webhook Service's DNS name (`weft-pilot.weft-system.svc`). So:
//!
//! - DNS SANs are allowed only when the token's identity has the control plane's service account
//!   ([`CONTROL_PLANE_SERVICE_ACCOUNT`], pilot's; the namespace is whatever the token says).
//! - Every name must be one of a Service's in-cluster names in that same namespace: `<name>`,
//!   `<name>.<ns>`, `<name>.<ns>.svc` or `<name>.<ns>.svc.<cluster domain>` ([`CLUSTER_DOMAIN`]),
//!   with `<name>` a DNS-1035 label (what a Service name is). pilot can thus serve as any Service of
//!   its own namespace, never as one of another namespace, and never as an outside name.
//! - Anything else (another service account asking for a DNS name, a name in another namespace, a
//!   wildcard, an IP or e-mail SAN dressed as a name) is refused, and the whole CSR with it.
//!
//! The cluster domain is Kubernetes' default. The API server calls webhooks as `<svc>.<ns>.svc`,
//! so a cluster with another domain still gets working webhook certificates.

use crate::spiffe::SpiffeId;

/// The service account whose tokens may ask for DNS SANs: weft's control plane (pilot). Must equal
/// pilot's `PILOT_SERVICE_ACCOUNT` (a pilot test checks it).
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "pilot";
/// The cluster domain accepted after `.svc.` (Kubernetes' default).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Why a DNS SAN was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsSanError {
    /// The caller is not the control plane.
    #[error(
        "DNS name {name:?} refused: only the control plane's service account ({CONTROL_PLANE_SERVICE_ACCOUNT}) may have DNS names, the caller is {identity}"
    )]
    NotControlPlane {
        /// The name asked for.
        name: String,
        /// The caller.
        identity: String,
    },
    /// The name is not one of a Service's names in the caller's namespace.
    #[error(
        "DNS name {name:?} refused: only <service>, <service>.{namespace}, <service>.{namespace}.svc or <service>.{namespace}.svc.{CLUSTER_DOMAIN} are allowed"
    )]
    NotOwnService {
        /// The name asked for.
        name: String,
        /// The caller's namespace.
        namespace: String,
    },
}

/// Checks every DNS name a CSR asks for against the rule in the module docs.
pub fn check_dns_names<S: AsRef<str>>(identity: &SpiffeId, names: &[S]) -> Result<(), DnsSanError> {
    for name in names {
        let name = name.as_ref();
        if identity.service_account() != CONTROL_PLANE_SERVICE_ACCOUNT {
            return Err(DnsSanError::NotControlPlane {
                name: name.to_owned(),
                identity: identity.to_string(),
            });
        }
        if !is_own_service_name(name, identity.namespace()) {
            return Err(DnsSanError::NotOwnService {
                name: name.to_owned(),
                namespace: identity.namespace().to_owned(),
            });
        }
    }
    Ok(())
}

/// The four names of Service `name` in `namespace`, shortest first: what a webhook certificate
/// carries.
pub fn service_names(name: &str, namespace: &str) -> Vec<String> {
    vec![
        name.to_owned(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
    ]
}

fn is_own_service_name(name: &str, namespace: &str) -> bool {
    let (service, rest) = name.split_once('.').unwrap_or((name, ""));
    if !is_dns1035_label(service) {
        return false;
    }
    if rest.is_empty() {
        return true;
    }
    rest == namespace
        || rest.strip_prefix(namespace).is_some_and(|after_ns| {
            after_ns == ".svc" || after_ns.strip_prefix(".svc.") == Some(CLUSTER_DOMAIN)
        })
}

/// A Service name: 1-63 of `[a-z0-9-]`, starting with a letter, not ending with `-`.
fn is_dns1035_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    #[test]
    fn pilot_may_have_its_own_namespaces_service_names() {
        let pilot = id("weft-system", "pilot");
        let names = service_names("weft-pilot", "weft-system");
        assert_eq!(
            names,
            [
                "weft-pilot",
                "weft-pilot.weft-system",
                "weft-pilot.weft-system.svc",
                "weft-pilot.weft-system.svc.cluster.local"
            ]
        );
        assert_eq!(check_dns_names(&pilot, &names), Ok(()));
        // Another Service of the same namespace, and pilot installed in another namespace.
        assert_eq!(check_dns_names(&pilot, &["istiod.weft-system.svc"]), Ok(()));
        let elsewhere = id("mesh", "pilot");
        assert_eq!(
            check_dns_names(&elsewhere, &service_names("weft-pilot", "mesh")),
            Ok(())
        );
        assert_eq!(
            check_dns_names::<&str>(&id("default", "sleep"), &[]),
            Ok(())
        );
    }

    #[test]
    fn other_service_accounts_get_no_dns_names() {
        for (ns, sa) in [
            ("weft-system", "weft-ca"),
            ("default", "sleep"),
            ("weft-system", "pilot2"),
        ] {
            let err = check_dns_names(&id(ns, sa), &["weft-pilot"]).unwrap_err();
            assert!(matches!(err, DnsSanError::NotControlPlane { .. }), "{err}");
        }
    }

    #[test]
    fn names_outside_pilots_namespace_or_not_service_names_are_refused() {
        let pilot = id("weft-system", "pilot");
        for name in [
            "weft-pilot.default",
            "weft-pilot.default.svc",
            "kubernetes.default.svc.cluster.local",
            "weft-pilot.weft-system.svc.example.com",
            "weft-pilot.weft-system.svc.cluster.local.evil.com",
            "weft-pilot.weft-system.svc.",
            "weft-pilot.weft-system.",
            "weft-pilot.weft-systemx.svc",
            "weft-pilot.weft-system.pod",
            "*.weft-system.svc",
            "Weft-Pilot.weft-system.svc",
            "1pilot.weft-system.svc",
            "pilot-.weft-system.svc",
            "",
            ".weft-system.svc",
            "example.com",
            "127.0.0.1",
        ] {
            let err = check_dns_names(&pilot, &["weft-pilot", name]).unwrap_err();
            assert!(
                matches!(err, DnsSanError::NotOwnService { .. }),
                "{name:?}: {err}"
            );
        }
        let long = "a".repeat(64);
        assert!(check_dns_names(&pilot, &[long]).is_err());
    }
}
