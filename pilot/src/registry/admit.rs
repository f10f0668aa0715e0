//! The registry rule: which workload a sidecar's stream is, decided from the platform, never from
//! what the sidecar says about itself.
//!
//! A sidecar's first request names its pod (namespace and name) and repeats what it believes of it
//! (service account, labels, IP). pilot looks the pod up among the platform's Pods (applied by the
//! local runtime, or read from the API server) and admits the stream only when the certificate's
//! namespace and service account are the pod's and every claim agrees with the pod: the claimed
//! labels must be labels the pod has (a subset, so labels added to a running pod do not lock its
//! sidecar out) and the claimed IP the pod's IP. The workload then takes labels, IP and ports from
//! the pod. Without this, a sidecar of service account `sleep` claiming `app=echo` became an
//! endpoint of the echo Service.
//!
//! `pilot serve --trust-workload-claims` (insecure, for setups without a platform) admits what the
//! sidecar claims once its namespace and service account match its certificate.

use weft_ca::SpiffeId;
use weft_pilot_config::pod::Pod;
use weft_pilot_config::translate::Workload;
use weft_pilot_config::{Kind, Resource, ResourceKey};
use weft_proto::discovery as pb;

use crate::store::Snapshot;

/// Why a stream was refused: the gRPC code to answer with and the reason shown to the sidecar and
/// in `pilot proxy-status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub(crate) struct Refusal {
    pub(crate) code: tonic::Code,
    pub(crate) reason: String,
}

impl Refusal {
    fn denied(reason: String) -> Self {
        Self {
            code: tonic::Code::PermissionDenied,
            reason,
        }
    }

    fn invalid(reason: impl Into<String>) -> Self {
        Self {
            code: tonic::Code::InvalidArgument,
            reason: reason.into(),
        }
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        tonic::Status::new(r.code, r.reason)
    }
}

/// The workload `node` is, given the certificate `peer` presented and the platform's `pods`;
/// `trust_claims` is `--trust-workload-claims`.
pub(crate) fn admit(
    node: &pb::Node,
    peer: &SpiffeId,
    pods: &Snapshot,
    trust_claims: bool,
) -> Result<Workload, Refusal> {
    if node.namespace != peer.namespace() || node.service_account != peer.service_account() {
        return Err(Refusal::denied(format!(
            "client certificate is {peer}, but the node claims namespace {:?} and service account {:?}",
            node.namespace, node.service_account
        )));
    }
    if node.name.is_empty() {
        return Err(Refusal::invalid("node.name (the pod name) is empty"));
    }
    let inbound_port = u16::try_from(node.inbound_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Refusal::invalid("node.inbound_port must be 1..65535"))?;
    let claimed = Workload {
        inbound_port: u32::from(inbound_port),
        ..Workload::from(node)
    };
    if trust_claims {
        if node.ip.parse::<std::net::IpAddr>().is_err() {
            return Err(Refusal::invalid(format!(
                "node.ip {:?} is not an IP address",
                node.ip
            )));
        }
        return Ok(claimed);
    }
    let pod = find_pod(pods, &node.namespace, &node.name).ok_or_else(|| {
        Refusal::denied(format!(
            "no pod {}/{} is registered: pilot takes a workload's labels, address and service \
             account from its Pod (the API server's, or one applied by the local runtime), never \
             from the sidecar",
            node.namespace, node.name
        ))
    })?;
    check_claims(node, pod)?;
    resolve(&claimed, pod).ok_or_else(|| {
        Refusal::denied(format!(
            "pod {}/{} has no IP yet (status.podIP)",
            node.namespace, node.name
        ))
    })
}

/// The claims that must agree with the pod.
fn check_claims(node: &pb::Node, pod: &Pod) -> Result<(), Refusal> {
    let name = format!("{}/{}", node.namespace, node.name);
    if pod.service_account() != node.service_account {
        return Err(Refusal::denied(format!(
            "pod {name} runs as service account {:?}, but the sidecar's certificate is for {:?}",
            pod.service_account(),
            node.service_account
        )));
    }
    for (key, value) in &node.labels {
        match pod.metadata.labels.get(key) {
            Some(v) if v == value => {}
            Some(v) => {
                return Err(Refusal::denied(format!(
                    "the sidecar claims label {key}={value}, but pod {name} has {key}={v}"
                )));
            }
            None => {
                return Err(Refusal::denied(format!(
                    "the sidecar claims label {key}={value}, which pod {name} does not have"
                )));
            }
        }
    }
    if !node.ip.is_empty() {
        let claimed = node.ip.parse::<std::net::IpAddr>().ok();
        if claimed.is_none() || claimed != pod.ip() {
            return Err(Refusal::denied(format!(
                "the sidecar claims IP {:?}, but pod {name} has {}",
                node.ip,
                pod.status.pod_ip.as_deref().unwrap_or("none")
            )));
        }
    }
    Ok(())
}

/// The pod `namespace/name` in `pods`.
pub(crate) fn find_pod<'a>(pods: &'a Snapshot, namespace: &str, name: &str) -> Option<&'a Pod> {
    let key = ResourceKey {
        kind: Kind::Pod,
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    match &pods.get(&key)?.resource {
        Resource::Pod(pod) => Some(pod),
        _ => None,
    }
}

/// `admitted` (a workload as its sidecar registered it) with the platform's facts from `pod`:
/// labels, IP, and ports when the pod declares any. `None` when the pod is no longer that workload
/// (no IP, or another service account under the same name).
pub(crate) fn resolve(admitted: &Workload, pod: &Pod) -> Option<Workload> {
    if pod.service_account() != admitted.service_account {
        return None;
    }
    let ip = pod.ip()?;
    let ports = pod.ports();
    Some(Workload {
        name: admitted.name.clone(),
        namespace: admitted.namespace.clone(),
        service_account: admitted.service_account.clone(),
        labels: pod.metadata.labels.clone(),
        ip: ip.to_string(),
        ports: if ports.is_empty() {
            admitted.ports.clone()
        } else {
            ports
        },
        inbound_port: admitted.inbound_port,
        captured: admitted.captured,
        workload_name: pod.workload_name(),
        no_sidecar: false,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn pods(list: Vec<Pod>) -> Snapshot {
        Snapshot::from_resources(1, list.into_iter().map(Resource::Pod).collect())
    }

    fn node(name: &str, sa: &str, l: &[(&str, &str)], ip: &str) -> pb::Node {
        pb::Node {
            name: name.into(),
            namespace: "default".into(),
            service_account: sa.into(),
            labels: l
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            ip: ip.into(),
            ports: vec![8000],
            inbound_port: 15006,
            captured: true,
            proxy_version: "0.0.0-test".into(),
        }
    }

    fn peer(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    fn echo_pod() -> Pod {
        Pod::new(
            "default",
            "echo-1",
            "echo",
            labels(&[("app", "echo"), ("version", "v1")]),
            Some("10.0.0.7".into()),
        )
    }

    #[test]
    fn a_sidecar_is_the_pod_it_names_with_the_pods_facts() {
        let snapshot = pods(vec![echo_pod()]);
        // Claims may be a subset of the pod's labels (labels added to a running pod).
        let n = node("echo-1", "echo", &[("app", "echo")], "10.0.0.7");
        let w = admit(&n, &peer("echo"), &snapshot, false).unwrap();
        assert_eq!(w.labels, labels(&[("app", "echo"), ("version", "v1")]));
        assert_eq!(w.ip, "10.0.0.7");
        assert_eq!(w.ports, vec![8000]);
        assert_eq!(w.inbound_port, 15006);
        // Claiming nothing is fine too: everything comes from the pod.
        let n = node("echo-1", "echo", &[], "");
        let w = admit(&n, &peer("echo"), &snapshot, false).unwrap();
        assert_eq!(w.ip, "10.0.0.7");
    }

    #[test]
    fn claims_the_pod_does_not_back_are_refused_with_the_reason() {
        let mut sleep = Pod::new(
            "default",
            "sleep-1",
            "sleep",
            labels(&[("app", "sleep")]),
            Some("10.0.0.9".into()),
        );
        sleep.spec.node_name = Some("node-a".into());
        let snapshot = pods(vec![echo_pod(), sleep]);
        let cases = [
            // The case: sa sleep claiming app=echo.
            (
                node("sleep-1", "sleep", &[("app", "echo")], "10.0.0.9"),
                "sleep",
                "claims label app=echo, but pod default/sleep-1 has app=sleep",
            ),
            (
                node("sleep-1", "sleep", &[("version", "v1")], "10.0.0.9"),
                "sleep",
                "which pod default/sleep-1 does not have",
            ),
            // Another pod's name: the certificate is not that pod's service account.
            (
                node("echo-1", "sleep", &[], "10.0.0.7"),
                "sleep",
                "runs as service account \"echo\"",
            ),
            (
                node("sleep-1", "sleep", &[], "10.0.0.7"),
                "sleep",
                "claims IP \"10.0.0.7\", but pod default/sleep-1 has 10.0.0.9",
            ),
            (
                node("ghost", "sleep", &[], "10.0.0.9"),
                "sleep",
                "no pod default/ghost is registered",
            ),
            (
                node("sleep-1", "sleep", &[], ""),
                "echo",
                "client certificate is spiffe://cluster.local/ns/default/sa/echo",
            ),
        ];
        for (n, cert_sa, want) in cases {
            let refusal = admit(&n, &peer(cert_sa), &snapshot, false).unwrap_err();
            assert_eq!(refusal.code, tonic::Code::PermissionDenied, "{want}");
            assert!(
                refusal.reason.contains(want),
                "{} !~ {want}",
                refusal.reason
            );
        }
    }

    #[test]
    fn a_pod_without_an_ip_admits_nobody() {
        let pod = Pod::new("default", "echo-1", "echo", labels(&[]), None);
        let refusal = admit(
            &node("echo-1", "echo", &[], ""),
            &peer("echo"),
            &pods(vec![pod]),
            false,
        )
        .unwrap_err();
        assert!(refusal.reason.contains("has no IP yet"), "{refusal}");
    }

    #[test]
    fn trusted_claims_are_taken_as_they_are_but_still_checked_against_the_certificate() {
        let empty = Snapshot::default();
        let n = node("anything", "sleep", &[("app", "echo")], "10.9.9.9");
        let w = admit(&n, &peer("sleep"), &empty, true).unwrap();
        assert_eq!(w.labels, labels(&[("app", "echo")]));
        assert!(admit(&n, &peer("echo"), &empty, true).is_err());
        let bad_ip = node("anything", "sleep", &[], "nope");
        assert_eq!(
            admit(&bad_ip, &peer("sleep"), &empty, true)
                .unwrap_err()
                .code,
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn resolve_follows_the_pod_and_drops_a_pod_that_is_someone_else_now() {
        let admitted = admit(
            &node("echo-1", "echo", &[], ""),
            &peer("echo"),
            &pods(vec![echo_pod()]),
            false,
        )
        .unwrap();
        let mut relabelled = echo_pod();
        relabelled
            .metadata
            .labels
            .insert("version".into(), "v2".into());
        let w = resolve(&admitted, &relabelled).unwrap();
        assert_eq!(w.labels.get("version").map(String::as_str), Some("v2"));
        let other = Pod::new(
            "default",
            "echo-1",
            "sleep",
            labels(&[]),
            Some("10.0.0.7".into()),
        );
        assert!(resolve(&admitted, &other).is_none());
    }
}
