//! Kubernetes objects in, weft's model out: pure functions, no I/O.
//!
//! - Istio objects go through the same parse and validation as `pilot apply` (the object is
//!   serialized to JSON, which is YAML, and parsed as one document), so a problem is reported with
//!   the same field path a `pilot apply` or `kubectl apply` through the webhook would give.
//! - Services are cut down to what weft's registry uses (selector, TCP ports, cluster IP); the
//!   Kubernetes features weft does not implement are dropped rather than refused, because the
//!   cluster accepted the object and other clients use it (see [`service`]).
//! - Workloads come from Pods and EndpointSlices (see [`workloads`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Map, Value, json};
use weft_pilot_config::translate::Workload;
use weft_pilot_config::{Kind, Resource};

use crate::inject::{PROXY_CONTAINER, STATUS_ANNOTATION};

/// Istio's injection status annotation (weft writes [`STATUS_ANNOTATION`]).
pub const ISTIO_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Istio's proxy container name (weft's is [`PROXY_CONTAINER`]).
pub const ISTIO_PROXY_CONTAINER: &str = "istio-proxy";
/// The sidecar's inbound listener in injected pods (Istio's and `pilot inject`'s 15006).
pub const INBOUND_PORT: u32 = 15006;

/// An object of the cluster that weft cannot serve, with every problem found, one line each
/// (`spec.http[0].route[0].weight: must not be negative, got -5`).
pub type Problems = Vec<String>;

/// Parses and validates an Istio object (as the API server returned it, as JSON) exactly as
/// `pilot apply` would a file holding it. `status` (written by other controllers, never by the
/// user) is dropped first.
pub fn istio_object(mut object: Value) -> Result<Resource, Problems> {
    if let Some(map) = object.as_object_mut() {
        map.remove("status");
    }
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let text = object.to_string();
    match weft_pilot_config::parse_documents("cluster", &text, &namespace) {
        Ok(mut resources) if resources.len() == 1 => Ok(resources.remove(0)),
        Ok(resources) => Err(vec![format!(
            "expected one object, parsed {}",
            resources.len()
        )]),
        // Positions would point into the JSON made here, not into anything the user wrote.
        Err(errors) => Err(errors
            .errors()
            .iter()
            .map(|e| e.error.to_string())
            .collect()),
    }
}

/// Why a Service of the cluster is not in weft's registry (a feature weft does not implement;
/// not an error of the object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// `type: ExternalName` (a DNS alias; Istio makes it a DNS cluster).
    ExternalName,
    /// `clusterIP: None` (Istio gives each endpoint its own listener).
    Headless,
    /// No cluster IP yet (the API server allocates one when it creates the Service).
    NoClusterIp,
    /// No TCP port (UDP and SCTP are not proxied).
    NoTcpPort,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::ExternalName => "type ExternalName is not implemented",
            Skip::Headless => "headless Services (clusterIP: None) are not implemented",
            Skip::NoClusterIp => "it has no cluster IP yet",
            Skip::NoTcpPort => "it has no TCP port",
        })
    }
}

/// What became of a Service.
// Not boxed: one lives at a time, while the builder goes through the Services.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceOutcome {
    /// In the registry.
    Served(Resource),
    /// Left out, with why.
    Skipped(Skip),
    /// Weft's validation refused what was left of it.
    Invalid(Problems),
}

/// Converts a Service to weft's `v1` Service: its selector, its TCP ports and the cluster IP the
/// API server allocated (pilot allocates none in this mode). Dropped rather than refused, because
/// they do not change where mesh traffic goes: `type` NodePort/LoadBalancer (in the mesh they are
/// their cluster IP), `sessionAffinity`, `internalTrafficPolicy`, `externalTrafficPolicy`,
/// `publishNotReadyAddresses` (endpoints come from the EndpointSlices' conditions), UDP/SCTP ports.
pub fn service(svc: &KubeService) -> ServiceOutcome {
    let Some(spec) = &svc.spec else {
        return ServiceOutcome::Skipped(Skip::NoClusterIp);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return ServiceOutcome::Skipped(Skip::ExternalName);
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        Some("None") => return ServiceOutcome::Skipped(Skip::Headless),
        None | Some("") => return ServiceOutcome::Skipped(Skip::NoClusterIp),
        Some(ip) => ip,
    };
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .map(|p| {
            let mut port = Map::new();
            if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
                port.insert("name".into(), json!(name));
            }
            port.insert("port".into(), json!(p.port));
            match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                    port.insert("targetPort".into(), json!(n));
                }
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => {
                    port.insert("targetPort".into(), json!(s));
                }
                None => {}
            }
            if let Some(app) = &p.app_protocol {
                port.insert("appProtocol".into(), json!(app));
            }
            Value::Object(port)
        })
        .collect();
    if ports.is_empty() {
        return ServiceOutcome::Skipped(Skip::NoTcpPort);
    }
    let mut metadata = json!({
        "name": svc.metadata.name,
        "namespace": svc.metadata.namespace.as_deref().unwrap_or("default"),
    });
    if let Some(labels) = svc.metadata.labels.as_ref().filter(|l| !l.is_empty()) {
        metadata["labels"] = json!(labels);
    }
    let mut spec_json = json!({ "ports": ports, "clusterIP": cluster_ip });
    if let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
        spec_json["selector"] = json!(selector);
    }
    let object = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": spec_json,
    });
    match serde_json::from_value::<Resource>(object) {
        Ok(resource) => {
            let problems = weft_pilot_config::validate(&resource);
            if problems.is_empty() {
                ServiceOutcome::Served(resource)
            } else {
                ServiceOutcome::Invalid(problems.iter().map(ToString::to_string).collect())
            }
        }
        Err(e) => ServiceOutcome::Invalid(vec![e.to_string()]),
    }
}

/// True when the pod carries a sidecar: the injection status annotation (weft's or Istio's), or a
/// proxy container (weft's or Istio's, for pods written with the sidecar by hand).
pub fn injected(pod: &Pod) -> bool {
    let annotated = pod.metadata.annotations.as_ref().is_some_and(|a| {
        a.contains_key(STATUS_ANNOTATION) || a.contains_key(ISTIO_STATUS_ANNOTATION)
    });
    annotated
        || pod.spec.as_ref().is_some_and(|spec| {
            spec.containers
                .iter()
                .any(|c| c.name == PROXY_CONTAINER || c.name == ISTIO_PROXY_CONTAINER)
        })
}

/// The workload a Pod is, whether or not it is an endpoint: `None` without a pod IP, or once the
/// pod has finished (phase Succeeded or Failed).
pub fn pod_workload(pod: &Pod) -> Option<Workload> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    let spec = pod.spec.as_ref()?;
    let sidecar = injected(pod);
    let mut ports: Vec<u32> = spec
        .containers
        .iter()
        .filter(|c| c.name != PROXY_CONTAINER && c.name != ISTIO_PROXY_CONTAINER)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| u32::try_from(p.container_port).ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    Some(Workload {
        name: pod.metadata.name.clone()?,
        namespace: pod.metadata.namespace.clone()?,
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ip: ip.to_string(),
        ports,
        inbound_port: INBOUND_PORT,
        // A pod without a sidecar is dialled on its application port; so is an injected one,
        // whose inbound traffic iptables captures.
        captured: true,
        workload_name: weft_pilot_config::pod::workload_name(
            pod.metadata.name.as_deref().unwrap_or_default(),
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"))
                .map(String::as_str),
            pod.metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| (o.kind.as_str(), o.name.as_str())),
        ),
        no_sidecar: !sidecar,
    })
}

/// The Pod record discovery admits sidecars against (`weft_pilot_config::pod::Pod`): name,
/// namespace, labels, service account, node, the application containers' TCP ports (the proxy's
/// own are not the application's), phase and IP. Annotations are left out, so a change nothing
/// reads publishes nothing.
pub fn pod_record(pod: &Pod) -> Result<Resource, Problems> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut record = weft_pilot_config::pod::Pod::new(
        namespace,
        name,
        spec.and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default"),
        pod.metadata.labels.clone().unwrap_or_default(),
        status
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty()),
    );
    record.spec.node_name = spec.and_then(|s| s.node_name.clone());
    // The controller names the workload (admitted sidecars take their workload name from here).
    record.metadata.owner_references = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller == Some(true))
        .map(|o| weft_pilot_config::resource::OwnerReference::controller(&o.kind, &o.name))
        .collect();
    record.status.phase = status.and_then(|s| s.phase.clone());
    record.spec.containers = spec
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|c| c.name != PROXY_CONTAINER && c.name != ISTIO_PROXY_CONTAINER)
        .map(|c| weft_pilot_config::pod::Container {
            name: Some(c.name.clone()),
            ports: c
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
                .map(|p| weft_pilot_config::pod::ContainerPort {
                    container_port: i64::from(p.container_port),
                    name: p.name.clone(),
                    protocol: None,
                })
                .collect(),
        })
        .collect();
    let resource = Resource::Pod(record);
    let problems = weft_pilot_config::validate(&resource);
    if problems.is_empty() {
        Ok(resource)
    } else {
        Err(problems.iter().map(ToString::to_string).collect())
    }
}

/// The endpoints the EndpointSlices list as ready and not terminating: (namespace, pod name) from
/// `targetRef` when it names a Pod, and (namespace, address) for every address.
///
/// Kubernetes sets `ready` false for a terminating endpoint (and `serving` keeps saying whether it
/// still answers); a nil `ready` means ready (the API's documented default). Istio sends only ready
/// endpoints by default (terminating ones leave at once unless the Service publishes not-ready
/// addresses), and so does weft.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadyEndpoints {
    pods: BTreeSet<(String, String)>,
    addresses: BTreeSet<(String, String)>,
}

impl ReadyEndpoints {
    /// Indexes `slices`.
    pub fn new<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Self {
        let mut ready = Self::default();
        for slice in slices {
            let namespace = slice.metadata.namespace.clone().unwrap_or_default();
            for endpoint in &slice.endpoints {
                let conditions = endpoint.conditions.as_ref();
                let is_ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                if !is_ready || terminating {
                    continue;
                }
                if let Some(target) = &endpoint.target_ref
                    && target.kind.as_deref() == Some("Pod")
                    && let Some(name) = &target.name
                {
                    let ns = target
                        .namespace
                        .clone()
                        .unwrap_or_else(|| namespace.clone());
                    ready.pods.insert((ns, name.clone()));
                }
                for address in &endpoint.addresses {
                    ready.addresses.insert((namespace.clone(), address.clone()));
                }
            }
        }
        ready
    }

    /// Whether some slice lists this workload as a ready endpoint.
    pub fn contains(&self, workload: &Workload) -> bool {
        self.pods
            .contains(&(workload.namespace.clone(), workload.name.clone()))
            || self
                .addresses
                .contains(&(workload.namespace.clone(), workload.ip.clone()))
    }
}

/// The live workloads: every pod with an IP that some EndpointSlice lists ready (Services select
/// pods by labels, and the EndpointSlice controller says which of them take traffic), sorted by
/// namespace and name. A pod on another node is an endpoint like any other.
pub fn workloads<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    ready: &ReadyEndpoints,
) -> Vec<Workload> {
    let mut all: Vec<Workload> = pods
        .into_iter()
        .filter_map(pod_workload)
        .filter(|w| ready.contains(w))
        .collect();
    all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    all
}

/// The Istio kinds read from the cluster, with their resource (plural) names.
pub const ISTIO_KINDS: [(Kind, &str); 3] = [
    (Kind::VirtualService, "virtualservices"),
    (Kind::DestinationRule, "destinationrules"),
    (Kind::PeerAuthentication, "peerauthentications"),
];

/// Sorts and keys resources for comparison (two builds with the same set compare equal).
pub fn by_key(resources: Vec<Resource>) -> BTreeMap<weft_pilot_config::ResourceKey, Resource> {
    resources.into_iter().map(|r| (r.key(), r)).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn svc(spec: Value) -> KubeService {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn services_keep_what_routing_uses_and_skip_what_weft_does_not_implement() {
        let node_port = svc(json!({
            "type": "NodePort", "clusterIP": "10.96.3.4", "sessionAffinity": "ClientIP",
            "externalTrafficPolicy": "Local", "selector": {"app": "web"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
        }));
        let ServiceOutcome::Served(Resource::Service(s)) = service(&node_port) else {
            panic!("{:?}", service(&node_port));
        };
        assert_eq!(s.spec.cluster_ip.as_deref(), Some("10.96.3.4"));
        assert_eq!(s.spec.ports.len(), 1, "the UDP port is dropped");
        assert_eq!(s.spec.ports[0].target().to_string(), "http");
        assert_eq!(s.spec.selector["app"], "web");

        let headless = svc(json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        assert_eq!(service(&headless), ServiceOutcome::Skipped(Skip::Headless));
        let external = svc(json!({"type": "ExternalName", "externalName": "example.com"}));
        assert_eq!(
            service(&external),
            ServiceOutcome::Skipped(Skip::ExternalName)
        );
        let udp =
            svc(json!({"clusterIP": "10.96.3.5", "ports": [{"port": 53, "protocol": "UDP"}]}));
        assert_eq!(service(&udp), ServiceOutcome::Skipped(Skip::NoTcpPort));
        let bad = svc(
            json!({"clusterIP": "10.96.3.6", "ports": [{"port": 80, "targetPort": "Not_A_Name"}]}),
        );
        let ServiceOutcome::Invalid(problems) = service(&bad) else {
            panic!("{:?}", service(&bad));
        };
        assert!(
            problems[0].starts_with("spec.ports[0].targetPort:"),
            "{problems:?}"
        );
    }

    #[test]
    fn istio_objects_get_the_field_paths_pilot_apply_gives() {
        let vs = json!({
            "apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
            "metadata": {"name": "r", "namespace": "shop", "resourceVersion": "7", "uid": "u",
                         "generation": 2, "managedFields": [{"manager": "kubectl"}]},
            "spec": {"hosts": ["web"], "http": [{"timeout": "soon", "route": [{"destination": {"host": "web"}}]}]},
            "status": {"observedGeneration": 2},
        });
        let problems = istio_object(vs.clone()).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("spec.http[0].timeout:"),
            "{problems:?}"
        );
        let mut ok = vs;
        ok["spec"]["http"][0]["timeout"] = json!("5s");
        let resource = istio_object(ok).unwrap();
        assert_eq!(resource.key().to_string(), "VirtualService shop/r");
    }

    fn pod(annotations: Value, containers: Value, status: Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "shop", "labels": {"app": "web"}, "annotations": annotations},
            "spec": {"containers": containers},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn pods_are_workloads_while_they_have_an_ip_and_run() {
        let app = json!([{"name": "app", "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]}]);
        let running = json!({"phase": "Running", "podIP": "10.1.2.3"});
        let plain = pod(json!({}), app.clone(), running.clone());
        assert!(!injected(&plain));
        let w = pod_workload(&plain).unwrap();
        assert!(w.no_sidecar, "a plaintext endpoint");
        assert_eq!(
            (w.service_account.as_str(), w.ports.as_slice()),
            ("default", &[8080][..])
        );
        assert!(injected(&pod(
            json!({"sidecar.istio.io/status": "{}"}),
            app.clone(),
            running.clone()
        )));
        let with_proxy = json!([{"name": "app"}, {"name": "istio-proxy"}]);
        assert!(injected(&pod(json!({}), with_proxy, running)));
        assert!(pod_workload(&pod(json!({}), app.clone(), json!({"phase": "Pending"}))).is_none());
        assert!(
            pod_workload(&pod(
                json!({}),
                app,
                json!({"phase": "Succeeded", "podIP": "10.1.2.3"})
            ))
            .is_none()
        );
    }

    #[test]
    fn endpoints_count_while_ready_and_not_terminating() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "s", "namespace": "shop"}, "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.9.9.9"], "targetRef": {"kind": "Pod", "name": "by-ref"}},
            ],
        }))
        .unwrap();
        let ready = ReadyEndpoints::new([&slice]);
        let wl = |name: &str, ip: &str| Workload {
            name: name.into(),
            namespace: "shop".into(),
            ip: ip.into(),
            ..Workload::default()
        };
        assert!(
            ready.contains(&wl("a", "10.0.0.1")),
            "no conditions = ready"
        );
        assert!(!ready.contains(&wl("b", "10.0.0.2")), "terminating");
        assert!(!ready.contains(&wl("c", "10.0.0.3")), "not ready");
        assert!(ready.contains(&wl("by-ref", "10.1.1.1")), "by targetRef");
        let other_ns = Workload {
            namespace: "other".into(),
            ..wl("a", "10.0.0.1")
        };
        assert!(!ready.contains(&other_ns));
    }
}
