//! The mesh's workloads as callers (`ProxyConfig.peers`): what an inbound sidecar needs to name the
//! workload behind a verified client certificate in its `source_*` metric labels.
//!
//! A certificate names a service account, and several workloads may run as one (the seed's httpbin
//! v1 and v2 both run as `httpbin`), so the peers of such an identity also list their pods' IPs: the
//! inbound side picks the workload whose pods include the connection's source address, among those
//! with the proven identity only. A peer alone with its identity lists no address: the table (sent
//! to every sidecar) then changes only when a workload comes or goes, not when its pods do, so
//! scaling or rolling a Deployment pushes nothing mesh-wide. An address cannot make a caller look like a workload of another identity, so a
//! workload that forges its source address gains at most the name of a sibling with the same
//! service account.

use std::collections::BTreeMap;

use weft_proto::discovery as pb;

use super::Workload;

/// The pod labels metric labels are read from: `app`, `version` and Istio's canonical
/// service/revision labels. The rest would only make every view larger.
const METRIC_LABELS: [&str; 6] = [
    "app",
    "version",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/name",
    "app.kubernetes.io/version",
];

/// One peer per (identity, workload, the labels the metrics read), with every address of its pods,
/// in a stable order. Pods without a sidecar never present a certificate and are left out.
pub fn build(workloads: &[Workload], trust_domain: &str) -> Vec<pb::Peer> {
    type Key = (String, String, String, BTreeMap<String, String>);
    let mut peers: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    for w in workloads.iter().filter(|w| !w.no_sidecar) {
        let labels = METRIC_LABELS
            .iter()
            .filter_map(|k| w.labels.get(*k).map(|v| ((*k).to_string(), v.clone())))
            .collect();
        let key = (
            w.identity(trust_domain),
            w.owner().to_string(),
            w.namespace.clone(),
            labels,
        );
        let addresses = peers.entry(key).or_default();
        if !w.ip.is_empty() {
            addresses.push(w.ip.clone());
        }
    }
    let mut per_identity: BTreeMap<&str, usize> = BTreeMap::new();
    for (identity, ..) in peers.keys() {
        *per_identity.entry(identity.as_str()).or_default() += 1;
    }
    let shared: std::collections::BTreeSet<String> = per_identity
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(identity, _)| identity.to_string())
        .collect();
    peers
        .into_iter()
        .map(|((identity, workload, namespace, labels), mut addresses)| {
            if shared.contains(&identity) {
                addresses.sort();
                addresses.dedup();
            } else {
                addresses.clear();
            }
            pb::Peer {
                identity,
                workload,
                namespace,
                labels: labels.into_iter().collect(),
                addresses,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, owner: &str, sa: &str, ip: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: name.into(),
            workload_name: owner.into(),
            namespace: "default".into(),
            service_account: sa.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            ip: ip.into(),
            ..Workload::default()
        }
    }

    #[test]
    fn pods_of_one_workload_are_one_peer_and_siblings_of_one_identity_stay_apart() {
        let v1 = [
            ("app", "httpbin"),
            ("version", "v1"),
            ("pod-template-hash", "abc"),
        ];
        let v2 = [("app", "httpbin"), ("version", "v2")];
        let mut no_sidecar = pod("db", "", "db", "10.0.0.9", &[("app", "db")]);
        no_sidecar.no_sidecar = true;
        let sleep = pod("sleep-x", "sleep", "sleep", "10.0.0.8", &[("app", "sleep")]);
        let peers = build(
            &[
                pod("httpbin-v1-abc-1", "httpbin-v1", "httpbin", "10.0.0.2", &v1),
                pod("httpbin-v1-abc-2", "httpbin-v1", "httpbin", "10.0.0.1", &v1),
                pod("httpbin-v2", "", "httpbin", "10.0.0.3", &v2),
                no_sidecar,
                sleep,
            ],
            "cluster.local",
        );
        assert_eq!(peers.len(), 3, "{peers:?}");
        let v1 = &peers[0];
        assert_eq!(v1.identity, "spiffe://cluster.local/ns/default/sa/httpbin");
        assert_eq!(v1.workload, "httpbin-v1");
        assert_eq!(v1.addresses, ["10.0.0.1", "10.0.0.2"]);
        // Only the labels metrics read travel.
        assert_eq!(v1.labels.len(), 2);
        assert_eq!(v1.labels.get("version").map(String::as_str), Some("v1"));
        assert_eq!(peers[1].workload, "httpbin-v2");
        assert_eq!(peers[1].addresses, ["10.0.0.3"]);
        // Alone with its identity: no addresses, so its pods come and go without a mesh-wide push.
        assert_eq!(peers[2].workload, "sleep");
        assert!(peers[2].addresses.is_empty(), "{peers:?}");
    }
}
