//! Kubernetes `v1` Pod, as the platform's record of a workload: who it runs as, where, with which
//! labels and address. pilot never takes these facts from a sidecar; it takes them from the Pod
//! (the API server's in Kubernetes; without Kubernetes, the one the local runtime applies before it
//! starts the pod, as a kubelet would).
//!
//! Only the fields pilot reads are accepted: a Pod here is a registry record, not something pilot
//! runs, so `image`, `command`, volumes and the like would be accepted and ignored. They are
//! refused with their field path instead (`kubectl get pod -o yaml` output is not meant to be
//! applied to pilot; in Kubernetes mode pilot reads Pods from the API server and needs no apply).

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::error::FieldPath;
use crate::resource::ObjectMeta;
use crate::validate::Report;

/// A Pod object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    /// Always `v1`.
    pub api_version: String,
    /// Always `Pod`.
    pub kind: String,
    /// Name, namespace, labels (the labels Services and subsets select), annotations.
    pub metadata: ObjectMeta,
    /// Service account, node, container ports.
    #[serde(default)]
    pub spec: PodSpec,
    /// The pod's address.
    #[serde(default)]
    pub status: PodStatus,
}

/// `spec` of a Pod: what pilot reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    /// The service account the pod runs as; Kubernetes' default is `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// The node it is scheduled on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Containers, for their ports only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<Container>,
}

/// One container: its name and the ports it declares.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Container {
    /// Container name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Declared ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
}

/// A declared container port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerPort {
    /// The port number.
    #[serde(default)]
    pub container_port: i64,
    /// Its name (a Service's `targetPort` may name it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `TCP` (the default) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `status` of a Pod: its address and phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodStatus {
    /// The pod's IP; a pod without one is not running yet and no sidecar may register as it.
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// `Pending`, `Running`, ... (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    // Server-set and redundant with `podIP` (weft is single-stack).
    #[serde(default, rename = "podIPs", skip_serializing)]
    pod_ips: Option<IgnoredAny>,
}

impl Pod {
    /// The name of the workload this pod is, as Istio names it (`destination_workload`,
    /// `source_workload`): its controller's name, where a ReplicaSet stands for the Deployment that
    /// made it (the name less `-<pod-template-hash>`) and a Job for its CronJob (less a numeric
    /// `-<schedule time>` suffix of 8 to 11 digits); the pod's own name without a controller.
    pub fn workload_name(&self) -> String {
        let name = self.metadata.name.as_deref().unwrap_or_default();
        workload_name(
            name,
            self.metadata
                .labels
                .get("pod-template-hash")
                .map(String::as_str),
            self.metadata
                .owner_references
                .iter()
                .find(|o| o.controller == Some(true))
                .map(|o| (o.kind.as_str(), o.name.as_str())),
        )
    }

    /// A Pod record (what the local runtime applies).
    pub fn new(
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: std::collections::BTreeMap<String, String>,
        ip: Option<String>,
    ) -> Self {
        let mut metadata = ObjectMeta::new(namespace, name);
        metadata.labels = labels;
        Self {
            api_version: "v1".into(),
            kind: "Pod".into(),
            metadata,
            spec: PodSpec {
                service_account_name: Some(service_account.to_string()),
                ..PodSpec::default()
            },
            status: PodStatus {
                pod_ip: ip,
                ..PodStatus::default()
            },
        }
    }

    /// The service account, `default` when unset (Kubernetes' admission sets the same).
    pub fn service_account(&self) -> &str {
        match self.spec.service_account_name.as_deref() {
            Some(sa) if !sa.is_empty() => sa,
            _ => "default",
        }
    }

    /// The pod IP, if it has one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.status.pod_ip.as_deref()?.parse().ok()
    }

    /// The declared container ports (deduplicated, sorted); empty when none are declared.
    pub fn ports(&self) -> Vec<u32> {
        let ports: BTreeSet<u32> = self
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|p| u32::try_from(p.container_port).ok())
            .collect();
        ports.into_iter().collect()
    }
}

impl Pod {
    pub(crate) fn validate(&self, report: &mut Report) {
        let spec = FieldPath::root().field("spec");
        if let Some(sa) = self.spec.service_account_name.as_deref() {
            report.dns1123_subdomain(&spec.field("serviceAccountName"), sa);
        }
        if let Some(node) = self.spec.node_name.as_deref() {
            report.dns1123_subdomain(&spec.field("nodeName"), node);
        }
        for (i, container) in self.spec.containers.iter().enumerate() {
            let path = spec.field("containers").index(i);
            for (j, port) in container.ports.iter().enumerate() {
                let path = path.field("ports").index(j);
                if !(1..=65535).contains(&port.container_port) {
                    report.invalid(
                        &path.field("containerPort"),
                        format!("must be 1..65535, not {}", port.container_port),
                    );
                }
                if let Some(protocol) = port.protocol.as_deref()
                    && protocol != "TCP"
                {
                    report.invalid(
                        &path.field("protocol"),
                        format!("only TCP is supported, not {protocol:?}"),
                    );
                }
            }
        }
        if let Some(ip) = self.status.pod_ip.as_deref()
            && ip.parse::<IpAddr>().is_err()
        {
            report.invalid(
                &FieldPath::root().field("status").field("podIP"),
                format!("{ip:?} is not an IP address"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::{Resource, parse_documents};

    #[test]
    fn a_pod_record_parses_with_the_fields_pilot_reads() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: httpbin-1\n  labels: {app: httpbin}\n\
                    spec:\n  serviceAccountName: httpbin\n  nodeName: node-a\n  containers:\n  \
                    - name: app\n    ports: [{containerPort: 8000}, {containerPort: 9000, protocol: TCP}]\n\
                    status:\n  podIP: 10.0.0.3\n  phase: Running\n  podIPs: [{ip: 10.0.0.3}]\n";
        let parsed = parse_documents("pod.yaml", yaml, "default").unwrap();
        let Resource::Pod(pod) = &parsed[0] else {
            panic!("{parsed:?}");
        };
        assert_eq!(pod.service_account(), "httpbin");
        assert_eq!(pod.ip(), Some("10.0.0.3".parse().unwrap()));
        assert_eq!(pod.ports(), vec![8000, 9000]);
        assert_eq!(parsed[0].namespace(), "default");
        // Without serviceAccountName: Kubernetes' default.
        let bare = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n";
        let Resource::Pod(pod) = &parse_documents("p.yaml", bare, "default").unwrap()[0] else {
            panic!();
        };
        assert_eq!(pod.service_account(), "default");
        assert_eq!(pod.ip(), None);
    }

    #[test]
    fn fields_pilot_would_ignore_or_bad_values_are_refused_with_their_path() {
        let refused = |yaml: &str, want: &str| {
            let errors = parse_documents("pod.yaml", yaml, "default").unwrap_err();
            assert!(errors.to_string().contains(want), "{errors} !~ {want}");
        };
        refused(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: app\n    image: nginx\n",
            "unknown field `image`",
        );
        refused(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  volumes: []\n",
            "unknown field `volumes`",
        );
        refused(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: not-an-ip}\n",
            "status.podIP: \"not-an-ip\" is not an IP address",
        );
        refused(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - ports: [{containerPort: 70000}]\n",
            "spec.containers[0].ports[0].containerPort: must be 1..65535",
        );
        refused(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {serviceAccountName: Bad_SA}\n",
            "spec.serviceAccountName",
        );
    }
}

/// Istio's workload name of pod `pod` with label `pod-template-hash` = `template_hash` and
/// controller `(kind, name)` (see [`Pod::workload_name`]).
pub fn workload_name(
    pod: &str,
    template_hash: Option<&str>,
    controller: Option<(&str, &str)>,
) -> String {
    let Some((kind, owner)) = controller else {
        return pod.to_string();
    };
    match kind {
        "ReplicaSet" => template_hash
            .filter(|h| !h.is_empty())
            .and_then(|h| owner.strip_suffix(h))
            .and_then(|rest| rest.strip_suffix('-'))
            .filter(|d| !d.is_empty())
            .unwrap_or(owner)
            .to_string(),
        "Job" => match owner.rsplit_once('-') {
            Some((cron, stamp))
                if !cron.is_empty()
                    && (8..=11).contains(&stamp.len())
                    && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron.to_string()
            }
            _ => owner.to_string(),
        },
        _ => owner.to_string(),
    }
}

#[cfg(test)]
mod workload_name_tests {
    use super::workload_name;

    #[test]
    fn workloads_are_named_as_istio_names_them() {
        // A Deployment's pod: its ReplicaSet less the template hash.
        assert_eq!(
            workload_name(
                "httpbin-v1-5d8f7b9c4-x2x9z",
                Some("5d8f7b9c4"),
                Some(("ReplicaSet", "httpbin-v1-5d8f7b9c4"))
            ),
            "httpbin-v1"
        );
        // A ReplicaSet made by hand (no hash label, or one its name does not end with).
        assert_eq!(
            workload_name("rs-abcde", None, Some(("ReplicaSet", "rs"))),
            "rs"
        );
        assert_eq!(
            workload_name("rs-abcde", Some("zzz"), Some(("ReplicaSet", "rs"))),
            "rs"
        );
        // A CronJob's Job, and a plain Job.
        assert_eq!(
            workload_name("backup-28457280-q", None, Some(("Job", "backup-28457280"))),
            "backup"
        );
        assert_eq!(
            workload_name("once-x", None, Some(("Job", "once-1234"))),
            "once-1234"
        );
        assert_eq!(
            workload_name("mig-x", None, Some(("Job", "migrate"))),
            "migrate"
        );
        // Other controllers by name; no controller: the pod.
        assert_eq!(
            workload_name("db-0", None, Some(("StatefulSet", "db"))),
            "db"
        );
        assert_eq!(workload_name("httpbin-v1", None, None), "httpbin-v1");
    }
}
