//! Cross-object warnings over a whole configuration, like `istioctl analyze`.
//!
//! These never block an apply: Istio accepts the same objects and fails at request time instead
//! (a route to a missing subset gives 503 `NC`), so the warning is what tells the user why.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::host;
use crate::resource::{Resource, ResourceKey};
use crate::virtual_service::{Destination, VirtualService};

/// Istio's code for a reference to something that does not exist.
pub const REFERENCED_RESOURCE_NOT_FOUND: &str = "IST0101";
/// Istio's code for a destination without a port to a Service with several ports.
pub const DESTINATION_PORT_SELECTOR_REQUIRED: &str = "IST0112";
/// Istio's code for an object that fails schema validation.
pub const SCHEMA_VALIDATION_ERROR: &str = "IST0106";

/// weft's own code (istioctl style, `WFT` for weft): a shadow-diff annotation that does nothing,
/// i.e. `weft.io/mirror-compare-ignore-*` without `weft.io/mirror-compare`, or
/// `weft.io/mirror-compare` on a VirtualService none of whose rules mirrors. A warning, not a
/// refusal: the object routes exactly as written, and a user may annotate before adding the mirror.
pub const MIRROR_COMPARE_WITHOUT_EFFECT: &str = "WFT0001";

/// A finding's severity, Istio's analyzer levels (`--failure-threshold`, `--output-threshold`),
/// ordered from least to most severe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Worth knowing.
    Info,
    /// Probably a mistake.
    Warning,
    /// Traffic will fail (Istio's level for every code weft reports).
    Error,
}

impl Level {
    /// `Info`, `Warning`, `Error`, as istioctl prints them.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "Info",
            Level::Warning => "Warning",
            Level::Error => "Error",
        }
    }

    /// The level Istio gives a message code (its messages.yaml); unknown codes count as `Warning`.
    pub fn of_code(code: &str) -> Level {
        match code {
            REFERENCED_RESOURCE_NOT_FOUND
            | SCHEMA_VALIDATION_ERROR
            | DESTINATION_PORT_SELECTOR_REQUIRED => Level::Error,
            _ => Level::Warning,
        }
    }

    /// Parses a level name, case-insensitively (istioctl accepts `error`, `Error`, `ERROR`).
    pub fn parse(name: &str) -> Option<Level> {
        [Level::Info, Level::Warning, Level::Error]
            .into_iter()
            .find(|level| level.as_str().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One analyzer finding.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Warning {
    /// Istio message code, e.g. `IST0101`.
    pub code: &'static str,
    /// The object the warning is about.
    pub object: ResourceKey,
    /// What is wrong, without the object: `host x.default.svc.cluster.local has no Service`.
    pub detail: String,
}

impl Warning {
    /// The full sentence, starting with the object: `VirtualService default/httpbin: ...`.
    pub fn message(&self) -> String {
        format!("{}: {}", self.object, self.detail)
    }

    /// Istio's level for this warning's code.
    pub fn level(&self) -> Level {
        Level::of_code(self.code)
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Warning [{}] {}: {}",
            self.code, self.object, self.detail
        )
    }
}

/// Analyzes a whole set of objects (the ones being applied plus those already stored) and
/// returns warnings sorted by object, then message. Objects are taken as valid.
pub fn analyze(resources: &[Resource]) -> Vec<Warning> {
    let index = Index::new(resources);
    let mut warnings = BTreeSet::new();
    for resource in resources {
        match resource {
            Resource::VirtualService(vs) => {
                check_virtual_service(&index, resource, vs, &mut warnings)
            }
            Resource::DestinationRule(dr) => {
                let fqdn = host::expand(&dr.spec.host, resource.namespace());
                if let Some(message) = index.missing_service(&fqdn) {
                    warnings.insert(warning(resource, &message));
                }
            }
            Resource::PeerAuthentication(_) | Resource::Service(_) | Resource::Pod(_) => {}
        }
    }
    warnings.into_iter().collect()
}

/// What the checks look up: Service ports by FQDN and subset names by DestinationRule host FQDN.
struct Index {
    service_ports: BTreeMap<String, usize>,
    subsets: BTreeMap<String, BTreeSet<String>>,
}

impl Index {
    fn new(resources: &[Resource]) -> Self {
        let mut service_ports = BTreeMap::new();
        let mut subsets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for resource in resources {
            match resource {
                Resource::Service(svc) => {
                    let fqdn = host::expand(resource.name(), resource.namespace());
                    service_ports.insert(fqdn, svc.spec.ports.len());
                }
                // exportTo is not taken into account: every rule counts in every namespace.
                Resource::DestinationRule(dr) => {
                    let fqdn = host::expand(&dr.spec.host, resource.namespace());
                    subsets
                        .entry(fqdn)
                        .or_default()
                        .extend(dr.spec.subsets.iter().map(|s| s.name.clone()));
                }
                _ => {}
            }
        }
        Self {
            service_ports,
            subsets,
        }
    }

    /// A message if `fqdn` is a cluster-local name without a Service (other hosts are external).
    fn missing_service(&self, fqdn: &str) -> Option<String> {
        if fqdn.starts_with('*') || host::service_of(fqdn).is_none() {
            return None;
        }
        (!self.service_ports.contains_key(fqdn)).then(|| format!("host {fqdn} has no Service"))
    }
}

fn check_virtual_service(
    index: &Index,
    resource: &Resource,
    vs: &VirtualService,
    warnings: &mut BTreeSet<Warning>,
) {
    check_mirror_compare(resource, vs, warnings);
    let namespace = resource.namespace();
    for route in &vs.spec.http {
        let routes = route.route.iter().map(|r| ("route to", &r.destination));
        let mirror = route.mirror.iter().map(|d| ("mirror to", d));
        let mirrors = route
            .mirrors
            .iter()
            .filter_map(|m| m.destination.as_ref())
            .map(|d| ("mirror to", d));
        for (what, destination) in routes.chain(mirror).chain(mirrors) {
            check_destination(index, resource, namespace, what, destination, warnings);
        }
    }
}

fn check_mirror_compare(
    resource: &Resource,
    vs: &VirtualService,
    warnings: &mut BTreeSet<Warning>,
) {
    use crate::virtual_service::mirror_compare::{self, MIRROR_COMPARE};
    let annotations = mirror_compare::read(&vs.metadata.annotations);
    let mut warn = |detail: String| {
        warnings.insert(Warning {
            code: MIRROR_COMPARE_WITHOUT_EFFECT,
            object: resource.key(),
            detail,
        });
    };
    if annotations.has_ignore && !vs.metadata.annotations.contains_key(MIRROR_COMPARE) {
        warn(format!(
            "weft.io/mirror-compare-ignore-* has no effect without annotation {MIRROR_COMPARE}"
        ));
    }
    let mirrors = vs
        .spec
        .http
        .iter()
        .any(|route| route.mirror.is_some() || !route.mirrors.is_empty());
    if annotations.compare.is_some() && !mirrors {
        warn(format!(
            "annotation {MIRROR_COMPARE} has no effect: no http route of this VirtualService has a mirror"
        ));
    }
}

fn check_destination(
    index: &Index,
    resource: &Resource,
    namespace: &str,
    what: &str,
    destination: &Destination,
    warnings: &mut BTreeSet<Warning>,
) {
    let fqdn = host::expand(&destination.host, namespace);
    if let Some(subset) = &destination.subset {
        let defined = index
            .subsets
            .get(&fqdn)
            .is_some_and(|names| names.contains(subset));
        if !defined {
            warnings.insert(warning(
                resource,
                &format!(
                    "{what} subset {subset} of host {fqdn}, but no DestinationRule defines it"
                ),
            ));
        }
    }
    if let Some(message) = index.missing_service(&fqdn) {
        warnings.insert(warning(resource, &message));
    }
    let port_given = destination.port.as_ref().and_then(|p| p.number).is_some();
    if !port_given && index.service_ports.get(&fqdn).is_some_and(|n| *n > 1) {
        warnings.insert(Warning {
            code: DESTINATION_PORT_SELECTOR_REQUIRED,
            object: resource.key(),
            detail: format!(
                "{what} host {fqdn} gives no port, but its Service has several; set destination.port.number"
            ),
        });
    }
}

fn warning(resource: &Resource, detail: &str) -> Warning {
    Warning {
        code: REFERENCED_RESOURCE_NOT_FOUND,
        object: resource.key(),
        detail: detail.to_string(),
    }
}
