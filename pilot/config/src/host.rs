//! Host names: short-name expansion to cluster FQDNs and host syntax checks.

use std::net::IpAddr;

/// The cluster DNS domain weft assumes (Istio's default).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Expands a host as written in an object of namespace `namespace` to the name routing uses.
///
/// - `*`, wildcards (`*.example.com`), IP addresses and names already ending in
///   `.svc.cluster.local` are unchanged.
/// - `name` (no dot) becomes `name.<namespace>.svc.cluster.local`, as Istio does.
/// - `name.ns` (exactly one dot) becomes `name.ns.svc.cluster.local`, and `name.ns.svc` becomes
///   `name.ns.svc.cluster.local`. Istio keeps any dotted name as written; weft expands these two
///   Kubernetes DNS forms because they can only mean a Service (see README, "Decisions").
/// - Any other dotted name is taken as an FQDN and kept.
pub fn expand(host: &str, namespace: &str) -> String {
    if host.starts_with('*') || host.parse::<IpAddr>().is_ok() {
        return host.to_string();
    }
    let fqdn_suffix = format!(".svc.{CLUSTER_DOMAIN}");
    if host.ends_with(&fqdn_suffix) {
        return host.to_string();
    }
    if host.ends_with(".svc") && host.matches('.').count() == 2 {
        return format!("{host}.{CLUSTER_DOMAIN}");
    }
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}{fqdn_suffix}"),
        1 => format!("{host}{fqdn_suffix}"),
        _ => host.to_string(),
    }
}

/// For a cluster FQDN `name.ns.svc.cluster.local`, the Service `(namespace, name)` it names.
pub fn service_of(fqdn: &str) -> Option<(&str, &str)> {
    let stem = fqdn.strip_suffix(&format!(".svc.{CLUSTER_DOMAIN}"))?;
    let (name, namespace) = stem.split_once('.')?;
    if namespace.contains('.') || name.is_empty() || namespace.is_empty() {
        return None;
    }
    Some((namespace, name))
}

/// Checks a host as used in `hosts`/`host`: a DNS name, optionally with a leading `*.` wildcard
/// (or `*` alone when `allow_wildcard`), or an IP address. Returns what is wrong.
pub(crate) fn check(host: &str, allow_wildcard: bool) -> Result<(), String> {
    if host.is_empty() {
        return Err("host must not be empty".to_string());
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let name = if let Some(rest) = host.strip_prefix("*.") {
        if !allow_wildcard {
            return Err(format!(
                "wildcard host {host:?} is not allowed here; use a Service name or FQDN"
            ));
        }
        rest
    } else if host == "*" {
        return Err(if allow_wildcard {
            "wildcard host * is not allowed with the mesh gateway; name the hosts".to_string()
        } else {
            "invalid destination host *: use a Service name or FQDN".to_string()
        });
    } else {
        host
    };
    if name.len() > 253 {
        return Err(format!("host {host:?} is longer than 253 characters"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "invalid host {host:?}: each dot-separated part must be 1-63 letters, digits or '-', not starting or ending with '-'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_table() {
        let cases = [
            ("httpbin", "default", "httpbin.default.svc.cluster.local"),
            ("reviews", "prod", "reviews.prod.svc.cluster.local"),
            (
                "httpbin.other",
                "default",
                "httpbin.other.svc.cluster.local",
            ),
            (
                "httpbin.other.svc",
                "default",
                "httpbin.other.svc.cluster.local",
            ),
            (
                "httpbin.other.svc.cluster.local",
                "default",
                "httpbin.other.svc.cluster.local",
            ),
            ("api.example.com", "default", "api.example.com"),
            ("*", "default", "*"),
            ("*.example.com", "default", "*.example.com"),
            ("10.0.0.1", "default", "10.0.0.1"),
            ("::1", "default", "::1"),
        ];
        for (host, namespace, want) in cases {
            assert_eq!(expand(host, namespace), want, "{host} in {namespace}");
        }
    }

    #[test]
    fn service_of_fqdn() {
        assert_eq!(
            service_of("httpbin.default.svc.cluster.local"),
            Some(("default", "httpbin"))
        );
        assert_eq!(service_of("api.example.com"), None);
        assert_eq!(service_of("a.b.c.svc.cluster.local"), None);
    }

    #[test]
    fn host_syntax() {
        assert!(check("httpbin", false).is_ok());
        assert!(check("httpbin.default.svc.cluster.local", false).is_ok());
        assert!(check("*.example.com", true).is_ok());
        assert!(check("*.example.com", false).is_err());
        assert!(check("*", true).is_err());
        assert!(check("*", false).is_err());
        assert!(check("", true).is_err());
        assert!(check("bad_host", true).is_err());
        assert!(check("-bad", true).is_err());
        assert!(check("a..b", true).is_err());
    }
}
