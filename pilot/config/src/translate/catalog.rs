//! The inputs of one translation, indexed and sorted, and the rules that pick which
//! VirtualService and DestinationRule apply to a host.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::destination_rule::DestinationRuleSpec;
use crate::host;
use crate::peer_authentication::PeerAuthenticationSpec;
use crate::resource::Resource;
use crate::service::ServiceSpec;
use crate::virtual_service::VirtualServiceSpec;

use super::{MeshOptions, Workload};

/// A Service with its FQDN.
#[derive(Debug)]
pub(super) struct ServiceView<'a> {
    pub(super) fqdn: String,
    pub(super) name: &'a str,
    pub(super) namespace: &'a str,
    /// `spec.clusterIP` (the store writes the allocated one); empty when absent.
    pub(super) vip: &'a str,
    pub(super) spec: &'a ServiceSpec,
}

/// A DestinationRule with its host expanded in its own namespace.
#[derive(Debug)]
pub(super) struct RuleView<'a, S> {
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
    pub(super) spec: &'a S,
    /// The object's annotations (a VirtualService's shadow-diff ones are read by translation).
    pub(super) annotations: &'a BTreeMap<String, String>,
    /// Expanded hosts (`host::expand` in the rule's namespace, §1.1).
    pub(super) hosts: Vec<String>,
}

impl<S> RuleView<'_, S> {
    fn by_key(a: &Self, b: &Self) -> std::cmp::Ordering {
        (a.namespace, a.name).cmp(&(b.namespace, b.name))
    }
}

/// What a node's local view looks at in a set of objects, found once for every node translated
/// from them (see [`super::translate_local_with`]).
#[derive(Clone, Debug, Default)]
pub struct LocalIndex {
    /// The Services that can select a workload: a non-empty selector, and the first Service of
    /// their FQDN in input order (as [`Catalog::new`] keeps them), as indexes into the objects, by
    /// namespace and then by the first label of their selector. A node looks up each of its own
    /// labels, so it meets only the Services that might select it (for a thousand Services, one
    /// instead of a thousand).
    services: HashMap<String, HashMap<String, HashMap<String, Vec<usize>>>>,
    /// The PeerAuthentications, indexes in input order.
    peer_authentications: Vec<usize>,
}

impl LocalIndex {
    /// Indexes `resources` (one pass).
    pub fn new(resources: &[Resource]) -> Self {
        let mut index = Self::default();
        let mut fqdns = HashSet::new();
        for (i, resource) in resources.iter().enumerate() {
            match resource {
                Resource::Service(svc) => {
                    let first = fqdns.insert(host::expand(resource.name(), resource.namespace()));
                    if let Some((key, value)) = svc.spec.selector.iter().next()
                        && first
                    {
                        index
                            .services
                            .entry(resource.namespace().to_string())
                            .or_default()
                            .entry(key.clone())
                            .or_default()
                            .entry(value.clone())
                            .or_default()
                            .push(i);
                    }
                }
                Resource::PeerAuthentication(_) => index.peer_authentications.push(i),
                _ => {}
            }
        }
        index
    }
}

/// Everything a translation looks at, sorted so the result does not depend on input order.
#[derive(Debug)]
pub(super) struct Catalog<'a> {
    services: Vec<ServiceView<'a>>,
    by_fqdn: BTreeMap<String, usize>,
    virtual_services: Vec<RuleView<'a, VirtualServiceSpec>>,
    /// `virtual_services` by host.
    virtual_service_hosts: HostIndex,
    destination_rules: Vec<RuleView<'a, DestinationRuleSpec>>,
    /// `destination_rules` by host.
    destination_rule_hosts: HostIndex,
    peer_authentications: Vec<RuleView<'a, PeerAuthenticationSpec>>,
    /// `peer_authentications` by namespace and selector.
    policies: PolicyIndex<'a>,
    workloads: Vec<&'a Workload>,
    /// Indexes into `workloads` by (namespace, label key, label value), for selector lookups.
    by_label: BTreeMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    node: &'a Workload,
    mesh: &'a MeshOptions,
}

impl<'a> Catalog<'a> {
    pub(super) fn new(
        resources: &'a [Resource],
        workloads: &'a [Workload],
        node: &'a Workload,
        mesh: &'a MeshOptions,
    ) -> Self {
        let mut services = Vec::new();
        let mut virtual_services = Vec::new();
        let mut destination_rules = Vec::new();
        let mut peer_authentications = Vec::new();
        for resource in resources {
            let namespace = resource.namespace();
            let name = resource.name();
            match resource {
                Resource::Service(svc) => services.push(ServiceView {
                    fqdn: host::expand(name, namespace),
                    name,
                    namespace,
                    vip: svc.spec.cluster_ip.as_deref().unwrap_or(""),
                    spec: &svc.spec,
                }),
                Resource::VirtualService(vs) => virtual_services.push(RuleView {
                    namespace,
                    name,
                    spec: &vs.spec,
                    annotations: &vs.metadata.annotations,
                    hosts: vs
                        .spec
                        .hosts
                        .iter()
                        .map(|h| host::expand(h, namespace))
                        .collect(),
                }),
                Resource::DestinationRule(dr) => destination_rules.push(RuleView {
                    namespace,
                    name,
                    spec: &dr.spec,
                    annotations: &dr.metadata.annotations,
                    hosts: vec![host::expand(&dr.spec.host, namespace)],
                }),
                Resource::PeerAuthentication(pa) => peer_authentications.push(RuleView {
                    namespace,
                    name,
                    spec: &pa.spec,
                    annotations: &pa.metadata.annotations,
                    hosts: Vec::new(),
                }),
                // Pods reach translation as workloads (discovery resolves them), not as objects.
                Resource::Pod(_) => {}
            }
        }
        services.sort_by(|a, b| a.fqdn.cmp(&b.fqdn));
        services.dedup_by(|a, b| a.fqdn == b.fqdn);
        let by_fqdn = services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.fqdn.clone(), i))
            .collect();
        virtual_services.sort_by(RuleView::by_key);
        destination_rules.sort_by(RuleView::by_key);
        peer_authentications.sort_by(RuleView::by_key);
        let mut workloads: Vec<&Workload> = workloads.iter().filter(|w| !w.ip.is_empty()).collect();
        workloads
            .sort_by(|a, b| (&a.namespace, &a.name, &a.ip).cmp(&(&b.namespace, &b.name, &b.ip)));
        workloads.dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
        let mut by_label: BTreeMap<(&str, &str, &str), Vec<usize>> = BTreeMap::new();
        for (i, w) in workloads.iter().enumerate() {
            for (key, value) in &w.labels {
                by_label
                    .entry((w.namespace.as_str(), key.as_str(), value.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        Self {
            services,
            by_fqdn,
            virtual_service_hosts: HostIndex::new(&virtual_services),
            virtual_services,
            destination_rule_hosts: HostIndex::new(&destination_rules),
            destination_rules,
            policies: PolicyIndex::new(&peer_authentications),
            peer_authentications,
            workloads,
            by_label,
            node,
            mesh,
        }
    }

    /// The part of [`Self::new`] a node's local view looks at, from an index built once for many
    /// nodes (pilot builds one local view per sidecar and push, so a pass over every object per
    /// sidecar was a thousand passes per push): the PeerAuthentications, and of the Services only
    /// those that select `node`, as [`Self::new`] keeps them (one per FQDN, the first in input
    /// order). No workloads, VirtualServices or DestinationRules. `index` must have been built from
    /// `resources`.
    pub(super) fn for_local(
        resources: &'a [Resource],
        index: &LocalIndex,
        node: &'a Workload,
        mesh: &'a MeshOptions,
    ) -> Self {
        let at = |i: &usize| resources.get(*i);
        let in_namespace = index.services.get(&node.namespace);
        let mut services: Vec<ServiceView<'a>> = node
            .labels
            .iter()
            .filter_map(|(key, value)| in_namespace?.get(key)?.get(value))
            .flatten()
            .filter_map(at)
            .filter_map(|resource| match resource {
                // `selects`: same namespace (the index's key), non-empty selector (the index
                // keeps no other), and every selector label on the node (the first one is, as
                // the index's key; each Service is under one key, so it comes up at most once).
                Resource::Service(svc) if labels_match(&svc.spec.selector, &node.labels) => {
                    Some(ServiceView {
                        fqdn: host::expand(resource.name(), resource.namespace()),
                        name: resource.name(),
                        namespace: resource.namespace(),
                        vip: svc.spec.cluster_ip.as_deref().unwrap_or(""),
                        spec: &svc.spec,
                    })
                }
                _ => None,
            })
            .collect();
        let mut peer_authentications: Vec<_> = index
            .peer_authentications
            .iter()
            .filter_map(at)
            .filter_map(|resource| match resource {
                Resource::PeerAuthentication(pa) => Some(RuleView {
                    namespace: resource.namespace(),
                    name: resource.name(),
                    spec: &pa.spec,
                    annotations: &pa.metadata.annotations,
                    hosts: Vec::new(),
                }),
                _ => None,
            })
            .collect();
        services.sort_by(|a, b| a.fqdn.cmp(&b.fqdn));
        peer_authentications.sort_by(RuleView::by_key);
        Self {
            services,
            by_fqdn: BTreeMap::new(),
            virtual_services: Vec::new(),
            virtual_service_hosts: HostIndex::default(),
            destination_rules: Vec::new(),
            destination_rule_hosts: HostIndex::default(),
            policies: PolicyIndex::new(&peer_authentications),
            peer_authentications,
            workloads: Vec::new(),
            by_label: BTreeMap::new(),
            node,
            mesh,
        }
    }

    /// Services sorted by FQDN (one per FQDN).
    pub(super) fn services(&self) -> &[ServiceView<'a>] {
        &self.services
    }

    pub(super) fn service(&self, fqdn: &str) -> Option<&ServiceView<'a>> {
        self.by_fqdn.get(fqdn).and_then(|&i| self.services.get(i))
    }

    /// The workloads a Service selects (see [`selects`]), sorted by namespace and name; only
    /// workloads with an IP count, one per name. Looked up through one selector label, so a
    /// translation costs about the number of endpoints, not Services × workloads.
    pub(super) fn selected_by(&self, svc: &ServiceView<'_>) -> Vec<&'a Workload> {
        let Some((key, value)) = svc.spec.selector.iter().next() else {
            return Vec::new();
        };
        self.by_label
            .get(&(svc.namespace, key.as_str(), value.as_str()))
            .map(|indexes| {
                indexes
                    .iter()
                    .filter_map(|&i| self.workloads.get(i).copied())
                    .filter(|w| selects(svc, w))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first PeerAuthentication (by name) of `namespace` without a selector: the namespace's
    /// policy, or the mesh's in the root namespace.
    pub(super) fn namespace_policy(
        &self,
        namespace: &str,
    ) -> Option<&RuleView<'a, PeerAuthenticationSpec>> {
        let i = *self.policies.wide.get(namespace)?;
        self.peer_authentications.get(i)
    }

    /// The first PeerAuthentication (by name) of the workload's namespace whose selector matches
    /// its labels. Looked up through each of the workload's labels, as a selector's first label,
    /// so the cost does not grow with the number of policies that select other workloads.
    pub(super) fn workload_policy(
        &self,
        workload: &Workload,
    ) -> Option<&RuleView<'a, PeerAuthenticationSpec>> {
        workload
            .labels
            .iter()
            .filter_map(|(key, value)| {
                self.policies.selected.get(&(
                    workload.namespace.as_str(),
                    key.as_str(),
                    value.as_str(),
                ))
            })
            .flatten()
            .copied()
            .filter(|&i| {
                #[cfg(test)]
                EXAMINED.with(|n| n.set(n.get() + 1));
                self.peer_authentications.get(i).is_some_and(|pa| {
                    selector(pa.spec).is_some_and(|labels| labels_match(labels, &workload.labels))
                })
            })
            .min()
            .and_then(|i| self.peer_authentications.get(i))
    }

    pub(super) fn node(&self) -> &'a Workload {
        self.node
    }

    pub(super) fn mesh(&self) -> &'a MeshOptions {
        self.mesh
    }

    /// The VirtualService whose rules route `fqdn` for this sidecar.
    ///
    /// Only VirtualServices bound to the sidecar gateway count (`gateways` absent or containing
    /// `mesh`). For sidecars Istio does not merge several VirtualServices for one host (merging is
    /// for gateways): one wins. Istio picks the oldest by `creationTimestamp`, which weft's store does
    /// not keep, so the order here is: an exact host over a `*.` wildcard (the longest wildcard
    /// first), then the node's namespace, the Service's namespace, other namespaces by name, and
    /// within a namespace the name. `exportTo` is not considered.
    pub(super) fn virtual_service_for(
        &self,
        fqdn: &str,
        service_namespace: &str,
    ) -> Option<&RuleView<'a, VirtualServiceSpec>> {
        self.virtual_service_hosts
            .candidates(fqdn)
            .into_iter()
            .filter_map(|i| self.virtual_services.get(i))
            .filter(|vs| {
                vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh")
            })
            .filter_map(|vs| {
                let specificity = vs.hosts.iter().filter_map(|h| host_match(h, fqdn)).max()?;
                Some((specificity, vs))
            })
            .min_by_key(|(specificity, vs)| {
                (
                    std::cmp::Reverse(*specificity),
                    self.namespace_rank(vs.namespace, service_namespace),
                    vs.namespace,
                    vs.name,
                )
            })
            .map(|(_, vs)| vs)
    }

    /// The DestinationRule for `fqdn`: the same precedence as [`Self::virtual_service_for`]
    /// (Istio looks in the client's namespace, then the Service's, then the root namespace). Istio
    /// can merge the subsets of several rules for one host; weft takes the first rule only.
    pub(super) fn destination_rule_for(
        &self,
        fqdn: &str,
        service_namespace: &str,
    ) -> Option<&RuleView<'a, DestinationRuleSpec>> {
        self.destination_rule_hosts
            .candidates(fqdn)
            .into_iter()
            .filter_map(|i| self.destination_rules.get(i))
            .filter_map(|dr| {
                let specificity = dr.hosts.iter().filter_map(|h| host_match(h, fqdn)).max()?;
                Some((specificity, dr))
            })
            .min_by_key(|(specificity, dr)| {
                (
                    std::cmp::Reverse(*specificity),
                    self.namespace_rank(dr.namespace, service_namespace),
                    dr.namespace,
                    dr.name,
                )
            })
            .map(|(_, dr)| dr)
    }

    fn namespace_rank(&self, namespace: &str, service_namespace: &str) -> u8 {
        if namespace == self.node.namespace {
            0
        } else if namespace == service_namespace {
            1
        } else if namespace == self.mesh.root_namespace {
            2
        } else {
            3
        }
    }
}

/// Rules (indexes into a sorted list) by the hosts they name, so finding the rules of a host costs
/// about the number of rules that could match it, not the number of rules: a scan of every rule per
/// Service made a translation quadratic (4,000 Services with a VirtualService and a DestinationRule
/// each took 2.9 s in a release build). A rule is under each of its hosts, ASCII-lowercased as
/// [`host_match`] compares: exact hosts by the whole host, `*` wildcards by the suffix after `*`.
#[derive(Debug, Default)]
struct HostIndex {
    exact: HashMap<String, Vec<usize>>,
    wildcard: HashMap<String, Vec<usize>>,
}

impl HostIndex {
    fn new<S>(rules: &[RuleView<'_, S>]) -> Self {
        let mut index = Self::default();
        for (i, rule) in rules.iter().enumerate() {
            for host in &rule.hosts {
                let host = host.to_ascii_lowercase();
                let (map, key) = match host.strip_prefix('*') {
                    Some(suffix) => (&mut index.wildcard, suffix.to_string()),
                    None => (&mut index.exact, host),
                };
                map.entry(key).or_default().push(i);
            }
        }
        index
    }

    /// Every rule with a host that may match `fqdn` (some more than once); [`host_match`] decides.
    fn candidates(&self, fqdn: &str) -> Vec<usize> {
        let lower = fqdn.to_ascii_lowercase();
        let mut found = self.exact.get(&lower).cloned().unwrap_or_default();
        if !self.wildcard.is_empty() {
            // A wildcard's suffix is a proper suffix of the FQDN (empty for `*`).
            let suffixes = lower
                .char_indices()
                .skip(1)
                .map(|(at, _)| &lower[at..])
                .chain([""]);
            found.extend(
                suffixes
                    .filter_map(|suffix| self.wildcard.get(suffix))
                    .flatten()
                    .copied(),
            );
        }
        #[cfg(test)]
        EXAMINED.with(|n| n.set(n.get() + found.len()));
        found
    }
}

#[cfg(test)]
thread_local! {
    /// Candidates the rule and policy lookups looked at, on this thread (tests run in parallel): a
    /// regression to a scan of every rule per Service shows as a count that grows with its square.
    pub(super) static EXAMINED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// PeerAuthentications (indexes into the sorted list) by what [`Catalog::namespace_policy`] and
/// [`Catalog::workload_policy`] look up.
#[derive(Debug, Default)]
struct PolicyIndex<'a> {
    /// The first policy without a selector, per namespace.
    wide: HashMap<&'a str, usize>,
    /// Policies with a selector, by namespace and their selector's first label, in list order.
    selected: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
}

impl<'a> PolicyIndex<'a> {
    fn new(policies: &[RuleView<'a, PeerAuthenticationSpec>]) -> Self {
        let mut index = Self::default();
        for (i, pa) in policies.iter().enumerate() {
            match selector(pa.spec).and_then(|labels| labels.iter().next()) {
                Some((key, value)) => index
                    .selected
                    .entry((pa.namespace, key.as_str(), value.as_str()))
                    .or_default()
                    .push(i),
                None => {
                    index.wide.entry(pa.namespace).or_insert(i);
                }
            }
        }
        index
    }
}

/// The selector's labels, or `None` for a namespace/mesh-wide policy (no or empty selector).
pub(super) fn selector(spec: &PeerAuthenticationSpec) -> Option<&BTreeMap<String, String>> {
    spec.selector
        .as_ref()
        .map(|s| &s.match_labels)
        .filter(|labels| !labels.is_empty())
}

/// How well a rule host matches an FQDN: `None` if it does not, otherwise larger is more specific
/// (an exact match beats any wildcard, a longer wildcard beats a shorter one).
fn host_match(rule_host: &str, fqdn: &str) -> Option<usize> {
    if rule_host.eq_ignore_ascii_case(fqdn) {
        return Some(usize::MAX);
    }
    let suffix = rule_host.strip_prefix('*')?;
    let matches = fqdn.len() > suffix.len()
        && fqdn
            .get(fqdn.len() - suffix.len()..)
            .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix));
    matches.then_some(suffix.len())
}

/// Kubernetes label selection: every selector label is on the workload. An empty selector
/// selects nothing for Services (they then have no endpoints, as with manual Endpoints).
pub(super) fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a Service picks a workload: same namespace, non-empty selector, all labels present.
pub(super) fn selects(svc: &ServiceView<'_>, workload: &Workload) -> bool {
    svc.namespace == workload.namespace
        && !svc.spec.selector.is_empty()
        && labels_match(&svc.spec.selector, &workload.labels)
}
