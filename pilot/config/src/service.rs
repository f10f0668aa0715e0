//! Kubernetes `v1` Service: the selector and ports weft's registry needs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::error::{FieldPath, Problem};
use crate::resource::{IgnoredStatus, ObjectMeta};
use crate::validate::{Report, dns1123_label};

type Unimplemented = Option<serde_json::Value>;

/// A Service object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    /// Always `v1`.
    pub api_version: String,
    /// Always `Service`.
    pub kind: String,
    /// Name, namespace, labels, annotations.
    pub metadata: ObjectMeta,
    /// Selector and ports.
    #[serde(default)]
    pub spec: ServiceSpec,
    #[serde(default, skip_serializing)]
    status: IgnoredStatus,
}

/// `spec` of a Service.
///
/// Accepted and ignored: server-populated fields that do not change routing (`clusterIPs`,
/// `ipFamilies`, `ipFamilyPolicy`, and `internalTrafficPolicy: Cluster`), so `kubectl get -o yaml`
/// output applies. Rejected as not implemented: `externalName`, `externalIPs`, load-balancer and
/// node-port fields, `sessionAffinity: ClientIP`, `publishNotReadyAddresses`, and so on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Pod labels that select the endpoints.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Service ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// Virtual IP; absent means the registry allocates one.
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    /// Only `ClusterIP` is implemented.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub service_type: Option<String>,
    /// Only `None` is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    #[serde(default, rename = "clusterIPs", skip_serializing)]
    cluster_ips: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    ip_families: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    ip_family_policy: Option<IgnoredAny>,
    /// Read to refuse `Local`; not stored (the server default, `Cluster`, is what weft does).
    #[serde(default, skip_serializing)]
    internal_traffic_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    external_name: Unimplemented,
    #[serde(
        default,
        rename = "externalIPs",
        skip_serializing_if = "Option::is_none"
    )]
    external_ips: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    external_traffic_policy: Unimplemented,
    #[serde(
        default,
        rename = "loadBalancerIP",
        skip_serializing_if = "Option::is_none"
    )]
    load_balancer_ip: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    load_balancer_source_ranges: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    load_balancer_class: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allocate_load_balancer_node_ports: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health_check_node_port: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    publish_not_ready_addresses: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session_affinity_config: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traffic_distribution: Unimplemented,
}

/// One Service port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name (DNS-1123 label); required when there are several ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The Service port.
    #[serde(default)]
    pub port: i64,
    /// Container port number or name; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    /// Only `TCP` (the default) is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Application protocol hint (`http`, `http2`, `grpc`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_port: Unimplemented,
}

impl ServicePort {
    /// The target port, defaulting to the Service port as Kubernetes does.
    pub fn target(&self) -> IntOrString {
        self.target_port
            .clone()
            .unwrap_or(IntOrString::Int(self.port))
    }
}

/// A port given as a number or as a named container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntOrString {
    /// A port number.
    Int(i64),
    /// A container port name.
    String(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(n) => write!(f, "{n}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

impl Serialize for IntOrString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrString::Int(n) => serializer.serialize_i64(*n),
            IntOrString::String(s) => serializer.serialize_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("port {v} is too large")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

// === validation ===

impl ServiceSpec {
    pub(crate) fn validate(&self, report: &mut Report, path: &FieldPath) {
        for (field, value) in [
            ("externalName", &self.external_name),
            ("externalIPs", &self.external_ips),
            ("externalTrafficPolicy", &self.external_traffic_policy),
            ("loadBalancerIP", &self.load_balancer_ip),
            (
                "loadBalancerSourceRanges",
                &self.load_balancer_source_ranges,
            ),
            ("loadBalancerClass", &self.load_balancer_class),
            (
                "allocateLoadBalancerNodePorts",
                &self.allocate_load_balancer_node_ports,
            ),
            ("healthCheckNodePort", &self.health_check_node_port),
            (
                "publishNotReadyAddresses",
                &self.publish_not_ready_addresses,
            ),
            ("sessionAffinityConfig", &self.session_affinity_config),
            ("trafficDistribution", &self.traffic_distribution),
        ] {
            report.not_implemented(&path.field(field), value, "");
        }
        if let Some(service_type) = self.service_type.as_deref()
            && service_type != "ClusterIP"
        {
            report.push(
                &path.field("type"),
                Problem::not_implemented(format!(
                    "only type ClusterIP is implemented, got {service_type:?}"
                )),
            );
        }
        if let Some(affinity) = self.session_affinity.as_deref()
            && affinity != "None"
        {
            report.push(
                &path.field("sessionAffinity"),
                Problem::not_implemented(format!("only None is implemented, got {affinity:?}")),
            );
        }
        match self.cluster_ip.as_deref() {
            None | Some("") => {}
            Some("None") => report.push(
                &path.field("clusterIP"),
                Problem::not_implemented("headless Services (clusterIP: None)"),
            ),
            Some(ip) if ip.parse::<IpAddr>().is_ok() => {}
            Some(ip) => report.invalid(
                &path.field("clusterIP"),
                format!("{ip:?} is not an IP address; use an IPv4/IPv6 address, or omit it to have one allocated"),
            ),
        }
        // `Local` keeps traffic on the caller's node; weft has no nodes, so it would be ignored.
        if let Some(policy) = self.internal_traffic_policy.as_deref()
            && policy != "Cluster"
        {
            report.push(
                &path.field("internalTrafficPolicy"),
                Problem::not_implemented(format!("only Cluster is implemented, got {policy:?}")),
            );
        }
        report.labels(&path.field("selector"), &self.selector);
        self.validate_ports(report, &path.field("ports"));
    }

    fn validate_ports(&self, report: &mut Report, path: &FieldPath) {
        if self.ports.is_empty() {
            report.push(path, Problem::required("a Service needs at least one port"));
        }
        let mut names = BTreeSet::new();
        let mut numbers = BTreeSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            let at = path.index(i);
            report.not_implemented(&at.field("nodePort"), &port.node_port, "");
            report.port(&at.field("port"), port.port);
            if !numbers.insert(port.port) {
                report.invalid(&at.field("port"), format!("duplicate port {}", port.port));
            }
            match port.name.as_deref() {
                None | Some("") if self.ports.len() > 1 => report.push(
                    &at.field("name"),
                    Problem::required("each port needs a name when a Service has several ports"),
                ),
                None | Some("") => {}
                Some(name) => {
                    report.dns1123_label(&at.field("name"), name);
                    if !names.insert(name) {
                        report.invalid(&at.field("name"), format!("duplicate port name {name:?}"));
                    }
                }
            }
            match &port.target_port {
                Some(IntOrString::Int(n)) => report.port(&at.field("targetPort"), *n),
                Some(IntOrString::String(name)) => {
                    if let Err(message) = port_name(name) {
                        report.invalid(&at.field("targetPort"), message);
                    }
                }
                None => {}
            }
            match port.protocol.as_deref() {
                None | Some("TCP") => {}
                Some(p @ ("UDP" | "SCTP")) => report.push(
                    &at.field("protocol"),
                    Problem::not_implemented(format!("only TCP is implemented, got {p}")),
                ),
                Some(p) => report.invalid(
                    &at.field("protocol"),
                    format!("protocol must be TCP, UDP or SCTP, got {p:?}"),
                ),
            }
        }
    }
}

/// A container port name (IANA_SVC_NAME): ≤ 15 lowercase alphanumerics or '-', with a letter.
fn port_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 15
        && dns1123_label(name).is_ok()
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid port name: use at most 15 lowercase letters, digits or '-', with at least one letter"
        ))
    }
}
