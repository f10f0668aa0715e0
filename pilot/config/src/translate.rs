//! Translation: config objects plus live workloads in, one sidecar's data-plane model out.
//!
//! [`translate`] is pure and deterministic: the same inputs, in any order, give the same
//! [`pb::ProxyConfig`] (services sorted by hostname, clusters by name, endpoints by address), so
//! pilot can compare [`fingerprint`]s to decide whether a sidecar needs a push. Each Istio rule it
//! reproduces is documented where it is applied, with its source in `istio-semantics.md` (§ numbers
//! below refer to that page); weft's own decisions are listed in `README.md`, "Translation".
//!
//! Layout: `catalog` indexes the inputs and picks the VirtualService/DestinationRule for a host,
//! `cluster` builds clusters and endpoints, `route` compiles VirtualService rules, `inbound` resolves
//! PeerAuthentication, `json` renders the model for golden files, and `fingerprint` hashes it.

mod catalog;
mod cluster;
mod fingerprint;
mod inbound;
mod json;
pub mod peers;
mod route;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use weft_proto::discovery as pb;

use crate::resource::Resource;
use crate::service::ServicePort;
use catalog::{Catalog, ServiceView};
use cluster::ClusterId;

pub use catalog::LocalIndex;

pub use fingerprint::{fingerprint, fingerprint_outbound, fingerprint_peers};
pub use json::to_json;

/// Istio's default root namespace (meshConfig `rootNamespace`): its selector-less PeerAuthentication
/// is mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// A live workload (registered by its sidecar's discovery stream): what the registry knows of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Pod name.
    pub name: String,
    /// The owning workload's name ([`crate::pod::Pod::workload_name`]); empty = the pod's name.
    pub workload_name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account (the identity's `sa` part).
    pub service_account: String,
    /// Pod labels: select the workload into Services and DestinationRule subsets.
    pub labels: BTreeMap<String, String>,
    /// Pod IP. A workload without one is never an endpoint.
    pub ip: String,
    /// Container ports the application listens on; empty = unknown.
    pub ports: Vec<u32>,
    /// The sidecar's inbound listener port (dialled when the pod is not captured).
    pub inbound_port: u32,
    /// True when iptables captures the pod's traffic, so peers dial the application port.
    pub captured: bool,
    /// True for a pod without a sidecar (known from the Kubernetes registry only): an endpoint
    /// reached in plaintext on its application port, with no identity to verify.
    pub no_sidecar: bool,
}

impl Workload {
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn identity(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// The owning workload's name, Istio's `*_workload` label.
    pub fn owner(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.name
        } else {
            &self.workload_name
        }
    }

    /// `<namespace>/<name>`, as endpoints name their workload.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl From<&pb::Node> for Workload {
    fn from(node: &pb::Node) -> Self {
        Self {
            name: node.name.clone(),
            // What a sidecar says of itself is only trusted with `--trust-workload-claims`; then
            // its pod name stands for its workload, as for a pod without a controller.
            workload_name: String::new(),
            namespace: node.namespace.clone(),
            service_account: node.service_account.clone(),
            labels: node
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ip: node.ip.clone(),
            ports: node.ports.clone(),
            inbound_port: node.inbound_port,
            captured: node.captured,
            no_sidecar: false,
        }
    }
}

/// Mesh-wide settings (Istio's MeshConfig, the parts weft uses).
#[derive(Clone, Debug, PartialEq)]
pub struct MeshOptions {
    /// SPIFFE trust domain, `cluster.local` by default.
    pub trust_domain: String,
    /// Append `-shadow` to mirrored requests' host (Istio ≤ 1.27, the seed); default true.
    pub mirror_shadow_suffix: bool,
    /// Trace sampling, 0..=100; default 100 here (translation tests see every span); `pilot serve`
    /// defaults to Istio's 1.
    pub sampling_percent: f64,
    /// Where selector-less PeerAuthentication is mesh-wide; default `istio-system`.
    pub root_namespace: String,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_string(),
            mirror_shadow_suffix: true,
            sampling_percent: 100.0,
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
        }
    }
}

/// Compiles the view of one sidecar (`node`) from the stored objects and the live workloads.
///
/// `workloads` are the endpoint candidates (include the node itself if it should be reachable
/// through its Services; the registry normally does). Objects are taken as validated; anything
/// that cannot be resolved (a missing subset, a host without a Service) still yields a cluster,
/// with no endpoints, so the sidecar answers 503 as Envoy does (§2.6).
///
/// The result is [`translate_local`] with the services and clusters of [`translate_outbound`];
/// pilot computes the two parts separately so that sidecars with the same [`OutboundKey`] share one
/// outbound part.
pub fn translate(
    resources: &[Resource],
    workloads: &[Workload],
    node: &Workload,
    mesh: &MeshOptions,
) -> pb::ProxyConfig {
    let catalog = Catalog::new(resources, workloads, node, mesh);
    let Outbound { services, clusters } = outbound(&catalog);
    pb::ProxyConfig {
        services,
        clusters,
        peers: peers::build(workloads, &mesh.trust_domain),
        ..local(&catalog, node)
    }
}

/// The part of a view that depends on the node only through its [`OutboundKey`]: the Services it
/// can call with their routes, and the clusters with their endpoints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outbound {
    /// As [`pb::ProxyConfig::services`].
    pub services: Vec<pb::OutboundService>,
    /// As [`pb::ProxyConfig::clusters`].
    pub clusters: Vec<pb::Cluster>,
}

/// What of a node its [`Outbound`] part depends on: its namespace (Service aliases, rule
/// precedence, `sourceNamespace`) and its values of the labels some VirtualService's
/// `sourceLabels` names (`None` for a label the node does not have). Nodes with equal keys get equal
/// outbound parts from the same objects and workloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutboundKey {
    namespace: String,
    labels: Vec<Option<String>>,
}

impl OutboundKey {
    /// The key of `node`, given the [`source_label_keys`] of the objects it is translated from.
    pub fn new(node: &Workload, source_label_keys: &BTreeSet<String>) -> Self {
        Self {
            namespace: node.namespace.clone(),
            labels: source_label_keys
                .iter()
                .map(|key| node.labels.get(key).cloned())
                .collect(),
        }
    }
}

/// Every label key a VirtualService's `sourceLabels` names: the only labels of a node its
/// [`Outbound`] part looks at.
pub fn source_label_keys(resources: &[Resource]) -> BTreeSet<String> {
    resources
        .iter()
        .filter_map(|r| match r {
            Resource::VirtualService(vs) => Some(vs),
            _ => None,
        })
        .flat_map(|vs| &vs.spec.http)
        .flat_map(|rule| &rule.matches)
        .flat_map(|m| m.source_labels.keys())
        .cloned()
        .collect()
}

/// The services and clusters of `node`'s view: the same as [`translate`]'s.
pub fn translate_outbound(
    resources: &[Resource],
    workloads: &[Workload],
    node: &Workload,
    mesh: &MeshOptions,
) -> Outbound {
    outbound(&Catalog::new(resources, workloads, node, mesh))
}

/// `node`'s view without services and clusters (mesh settings, inbound mode, tracing): the same
/// as [`translate`]'s. None of it depends on the live workloads. Indexes the objects first (about
/// a millisecond for a thousand Services); for many nodes, index them once and use
/// [`translate_local_with`] (about a microsecond per node).
pub fn translate_local(
    resources: &[Resource],
    node: &Workload,
    mesh: &MeshOptions,
) -> pb::ProxyConfig {
    translate_local_with(resources, &LocalIndex::new(resources), node, mesh)
}

/// [`translate_local`] with the objects indexed beforehand (`index` built from `resources`): costs
/// about the Services of the node's namespace plus the PeerAuthentications, not every object
/// (pilot computes a local view per sidecar and push).
pub fn translate_local_with(
    resources: &[Resource],
    index: &LocalIndex,
    node: &Workload,
    mesh: &MeshOptions,
) -> pb::ProxyConfig {
    local(&Catalog::for_local(resources, index, node, mesh), node)
}

fn outbound(catalog: &Catalog<'_>) -> Outbound {
    let mut wanted: BTreeSet<ClusterId> = BTreeSet::new();
    let services = catalog
        .services()
        .iter()
        .map(|svc| outbound_service(catalog, svc, &mut wanted))
        .collect();
    Outbound {
        services,
        clusters: cluster::build_all(catalog, &wanted),
    }
}

fn local(catalog: &Catalog<'_>, node: &Workload) -> pb::ProxyConfig {
    let mesh = catalog.mesh();
    pb::ProxyConfig {
        mesh: Some(pb::MeshSettings {
            trust_domain: mesh.trust_domain.clone(),
            mirror_shadow_suffix: mesh.mirror_shadow_suffix,
        }),
        services: Vec::new(),
        clusters: Vec::new(),
        inbound: Some(inbound::build(catalog, node)),
        tracing: Some(pb::Tracing {
            sampling_percent: mesh.sampling_percent.clamp(0.0, 100.0),
            service_name: tracing_service_name(node),
        }),
        peers: Vec::new(),
    }
}

/// One Service as seen from the node: names, VIP, and per port the protocol and the routes.
fn outbound_service(
    catalog: &Catalog<'_>,
    svc: &ServiceView<'_>,
    wanted: &mut BTreeSet<ClusterId>,
) -> pb::OutboundService {
    let ports = svc
        .spec
        .ports
        .iter()
        .filter_map(|port| {
            let number = u32::try_from(port.port).ok()?;
            let protocol = protocol_of(port);
            let routes = route::for_port(catalog, svc, number, protocol, wanted);
            Some(pb::ServicePort {
                name: port.name.clone().unwrap_or_default(),
                port: number,
                target_port: cluster::numeric_target_port(port).unwrap_or(0),
                protocol: protocol.to_string(),
                routes,
            })
        })
        .collect();
    pb::OutboundService {
        hostname: svc.fqdn.clone(),
        aliases: aliases(svc, &catalog.node().namespace),
        vip: svc.vip.to_string(),
        ports,
        namespace: svc.namespace.to_string(),
        name: svc.name.to_string(),
    }
}

/// Names that reach the Service from `from_namespace`, as Kubernetes DNS search paths allow and
/// Istio's sidecar virtual-host domains list them (§1.1, `generateVirtualHostDomains`): the short
/// name only within the Service's own namespace, then `name.ns`, `name.ns.svc`, and the FQDN.
fn aliases(svc: &ServiceView<'_>, from_namespace: &str) -> Vec<String> {
    let mut names = Vec::with_capacity(4);
    if svc.namespace == from_namespace {
        names.push(svc.name.to_string());
    }
    names.push(format!("{}.{}", svc.name, svc.namespace));
    names.push(format!("{}.{}.svc", svc.name, svc.namespace));
    names.push(svc.fqdn.clone());
    names
}

/// Istio's protocol selection (`protocol.Parse` on appProtocol, then the port-name prefix
/// `<proto>` or `<proto>-<suffix>`, case-insensitive), mapped onto the four values the data-plane
/// model knows. TLS-carrying and non-HTTP protocols (`https`, `tls`, `mongo`, `mysql`, `redis`, ...)
/// are opaque bytes to a sidecar that does not terminate them, so they become `tcp`. Anything
/// unnamed or unknown is `http`: Istio sniffs such ports, and weft's sidecar detects HTTP/1.1 and
/// h2c on every outbound connection anyway, falling back to opaque TCP (design.md, request path).
pub(crate) fn protocol_of(port: &ServicePort) -> &'static str {
    if let Some(app) = port.app_protocol.as_deref()
        && let Some(protocol) = known_protocol(app)
    {
        return protocol;
    }
    let name = port.name.as_deref().unwrap_or("");
    let prefix = name.split('-').next().unwrap_or("");
    known_protocol(prefix).unwrap_or("http")
}

fn known_protocol(value: &str) -> Option<&'static str> {
    let value = value.to_ascii_lowercase();
    Some(match value.as_str() {
        "http" | "http1" | "kubernetes.io/ws" | "grpc-web" => "http",
        "http2" | "h2c" | "kubernetes.io/h2c" => "http2",
        "grpc" => "grpc",
        "tcp" | "https" | "tls" | "kubernetes.io/wss" | "mongo" | "mysql" | "redis" | "thrift" => {
            "tcp"
        }
        _ => return None,
    })
}

/// `service.name` of the node's spans as Istio sets it: `<canonical service>.<namespace>`, the
/// canonical service being the first of the `service.istio.io/canonical-name`,
/// `app.kubernetes.io/name` and `app` labels, else the workload's name.
fn tracing_service_name(node: &Workload) -> String {
    let canonical = [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .into_iter()
    .find_map(|k| node.labels.get(k).filter(|v| !v.is_empty()))
    .map_or_else(|| node.owner(), String::as_str);
    format!("{canonical}.{}", node.namespace)
}
