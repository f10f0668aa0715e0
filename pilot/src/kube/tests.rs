//! The registry against an in-process API server (`weft_tests::kube_fake`): lists, watches,
//! bookmarks, 410 Gone, dropped watches, invalid objects, and the root ConfigMaps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use weft_pilot_config::{Kind, Resource, ResourceKey};
use weft_tests::kube_fake::{FakeApiServer, collection, collection_of};

use super::*;

const VS_V1: &str = "apis/networking.istio.io/v1/virtualservices";

async fn client(fake: &FakeApiServer) -> Client {
    let config = ::kube::Config::new(fake.url().parse().unwrap());
    Client::try_from(config).unwrap()
}

/// Polls `check` every 20 ms for at most 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn namespace(name: &str, labels: Value) -> Namespace {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
        "status": {"phase": "Active"},
    }))
    .unwrap()
}

fn service(name: &str, ip: &str) -> KubeService {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "selector": {"app": name}, "sessionAffinity": "None",
            "ports": [{"name": "http", "port": 8000, "targetPort": 80, "protocol": "TCP"}],
        },
    }))
    .unwrap()
}

fn pod(name: &str, ip: &str, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "httpbin"},
                     "annotations": annotations},
        "spec": {
            "serviceAccountName": "httpbin", "nodeName": "node-b",
            "containers": [
                {"name": "httpbin", "image": "httpbin", "ports": [{"containerPort": 80}]},
                {"name": "weft-proxy", "image": "weft", "ports": [{"containerPort": 15090}]},
            ],
        },
        "status": {"phase": "Running", "podIP": ip},
    }))
    .unwrap()
}

fn slice(endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "httpbin-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "httpbin"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    }))
    .unwrap()
}

fn endpoint(pod: &str, ip: &str, ready: bool, terminating: bool) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": true, "terminating": terminating},
        "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"},
    })
}

fn virtual_service(api_version: &str, name: &str, weight: i64) -> Value {
    json!({
        "apiVersion": api_version, "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "hosts": ["httpbin"],
            "http": [{"route": [
                {"destination": {"host": "httpbin"}, "weight": weight},
                {"destination": {"host": "httpbin"}, "weight": 100 - weight},
            ]}],
        },
        "status": {"conditions": [{"type": "Reconciled", "status": "True"}]},
    })
}

fn key(kind: Kind, name: &str) -> ResourceKey {
    ResourceKey {
        kind,
        namespace: "default".into(),
        name: name.into(),
    }
}

fn vs_weight(snapshot: &Snapshot, name: &str) -> Option<i64> {
    match &snapshot.get(&key(Kind::VirtualService, name))?.resource {
        Resource::VirtualService(vs) => {
            let json = serde_json::to_value(vs).unwrap();
            json.pointer("/spec/http/0/route/0/weight")
                .and_then(Value::as_i64)
        }
        _ => None,
    }
}

/// List (not watch) requests for Services so far.
fn service_lists(fake: &FakeApiServer) -> usize {
    fake.requests("GET /api/v1/services?")
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count()
}

async fn started(fake: &FakeApiServer, options: KubeOptions) -> (KubeRegistry, CancellationToken) {
    let shutdown = CancellationToken::new();
    let registry = KubeRegistry::start(client(fake).await, options, &shutdown);
    tokio::time::timeout(Duration::from_secs(10), registry.wait_synced())
        .await
        .expect("registry synced");
    (registry, shutdown)
}

#[tokio::test]
async fn the_registry_follows_the_cluster_through_changes_bookmarks_relists_and_dropped_watches() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(&namespace("default", json!({"istio-injection": "enabled"})));
    fake.apply(&service("httpbin", "10.96.0.10"));
    fake.apply(&pod(
        "httpbin-1",
        "10.1.0.5",
        json!({"sidecar.weft.dev/status": "{}"}),
    ));
    fake.apply(&slice(json!([endpoint(
        "httpbin-1",
        "10.1.0.5",
        true,
        false
    )])));
    fake.apply_json(
        VS_V1,
        virtual_service("networking.istio.io/v1", "split", 90),
    );
    let (registry, shutdown) = started(&fake, KubeOptions::default()).await;

    // Listed: the Service with the cluster's IP, the VirtualService, the injected pod.
    let snapshot = registry.snapshot();
    match &snapshot
        .get(&key(Kind::Service, "httpbin"))
        .unwrap()
        .resource
    {
        Resource::Service(svc) => {
            assert_eq!(svc.spec.cluster_ip.as_deref(), Some("10.96.0.10"));
            assert_eq!(svc.spec.ports[0].port, 8000);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vs_weight(&snapshot, "split"), Some(90));
    let workloads = WorkloadSource::workloads(&registry, &registry.snapshot());
    assert_eq!(workloads.len(), 1);
    let w = &workloads[0];
    assert_eq!(
        (
            w.name.as_str(),
            w.ip.as_str(),
            w.service_account.as_str(),
            w.ports.as_slice()
        ),
        ("httpbin-1", "10.1.0.5", "httpbin", &[80][..]),
        "the proxy's own ports are not the application's"
    );
    assert_eq!(w.inbound_port, 15006);
    assert!(!w.no_sidecar, "injected");
    // The Pod record sidecars are admitted against, without the proxy's ports.
    match &snapshot.get(&key(Kind::Pod, "httpbin-1")).unwrap().resource {
        Resource::Pod(p) => {
            assert_eq!(p.service_account(), "httpbin");
            assert_eq!(p.ip(), Some("10.1.0.5".parse().unwrap()));
            assert_eq!(p.ports(), vec![80]);
            assert_eq!(p.spec.node_name.as_deref(), Some("node-b"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        registry.namespace_labels("default").unwrap()["istio-injection"],
        "enabled"
    );
    assert!(registry.namespace_labels("nope").is_none());
    fake.apply(&namespace(
        "default",
        json!({"istio-injection": "disabled"}),
    ));
    eventually("the namespace's new label", || {
        registry
            .namespace_labels("default")
            .is_some_and(|l| l["istio-injection"] == "disabled")
    })
    .await;

    // Modified.
    let mut snapshots = registry.subscribe();
    snapshots.mark_unchanged();
    fake.apply_json(
        VS_V1,
        virtual_service("networking.istio.io/v1", "split", 50),
    );
    eventually("the modified VirtualService", || {
        vs_weight(&registry.snapshot(), "split") == Some(50)
    })
    .await;
    snapshots.mark_unchanged();
    let metrics = registry.metrics();
    let mut generations = WorkloadSource::subscribe(&registry);
    generations.mark_unchanged();

    // An annotation nothing reads, and a bookmark: seen, but nothing is published.
    let pod_applies = metrics.events("Pod", "apply");
    let published = metrics.snapshots();
    fake.apply(&pod(
        "httpbin-1",
        "10.1.0.5",
        json!({"sidecar.weft.dev/status": "{}", "unrelated": "x"}),
    ));
    assert!(fake.bookmark() > 0, "the watches asked for bookmarks");
    eventually("the pod event", || {
        metrics.events("Pod", "apply") > pod_applies
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metrics.snapshots(), published, "no new snapshot");
    assert!(!snapshots.has_changed().unwrap());
    assert!(!generations.has_changed().unwrap(), "no new workload set");

    // Deleted.
    assert!(fake.delete(VS_V1, "default", "split"));
    eventually("the VirtualService gone", || {
        registry
            .snapshot()
            .get(&key(Kind::VirtualService, "split"))
            .is_none()
    })
    .await;

    // 410 Gone: a change whose event was compacted away shows up through the relist.
    let lists_before_expiry = service_lists(&fake);
    let restarts = metrics.events("Service", "restart");
    fake.apply(&service("doomed", "10.96.0.13"));
    eventually("the Service to delete unseen", || {
        registry
            .snapshot()
            .get(&key(Kind::Service, "doomed"))
            .is_some()
    })
    .await;
    fake.apply_silently(&service("silent", "10.96.0.11"));
    assert!(fake.delete_silently(&collection_of::<KubeService>(), "default", "doomed"));
    fake.expire();
    eventually("the relisted Services", || {
        let snapshot = registry.snapshot();
        snapshot.get(&key(Kind::Service, "silent")).is_some()
            && snapshot.get(&key(Kind::Service, "doomed")).is_none()
    })
    .await;
    let relists = service_lists(&fake);
    assert!(
        relists > lists_before_expiry,
        "410 makes the watcher list again"
    );
    assert!(metrics.events("Service", "error") >= 1, "the 410 was seen");
    assert!(metrics.events("Service", "restart") > restarts);

    // A dropped watch resumes from its resourceVersion: the change made while it was down is
    // replayed, with no new list.
    eventually("services watched again", || {
        fake.open_watches(&collection_of::<KubeService>()) > 0
    })
    .await;
    let lists_before_drop = service_lists(&fake);
    fake.drop_watches();
    fake.apply(&service("after-drop", "10.96.0.12"));
    eventually("the Service created while the watch was down", || {
        registry
            .snapshot()
            .get(&key(Kind::Service, "after-drop"))
            .is_some()
    })
    .await;
    let lists_after_drop = service_lists(&fake);
    assert_eq!(lists_after_drop, lists_before_drop, "resumed, not relisted");

    // A terminating endpoint leaves; ready again, it comes back.
    fake.apply(&slice(json!([endpoint(
        "httpbin-1",
        "10.1.0.5",
        false,
        true
    )])));
    eventually("the terminating endpoint gone", || {
        WorkloadSource::workloads(&registry, &registry.snapshot()).is_empty()
    })
    .await;
    fake.apply(&slice(json!([endpoint(
        "httpbin-1",
        "10.1.0.5",
        true,
        false
    )])));
    eventually("the endpoint back", || {
        WorkloadSource::workloads(&registry, &registry.snapshot()).len() == 1
    })
    .await;
    shutdown.cancel();
}

#[tokio::test]
async fn invalid_objects_are_refused_counted_and_a_valid_version_stays_in_force() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(&service("httpbin", "10.96.0.10"));
    fake.apply_json(VS_V1, virtual_service("networking.istio.io/v1", "good", 80));
    fake.apply_json(VS_V1, virtual_service("networking.istio.io/v1", "bad", -5));
    let (registry, shutdown) = started(&fake, KubeOptions::default()).await;

    let snapshot = registry.snapshot();
    assert_eq!(vs_weight(&snapshot, "good"), Some(80));
    assert!(snapshot.get(&key(Kind::VirtualService, "bad")).is_none());
    let invalid = registry.invalid();
    assert_eq!(invalid.len(), 1);
    assert_eq!(invalid[0].key, key(Kind::VirtualService, "bad"));
    assert!(!invalid[0].previous_in_force);
    assert!(
        invalid[0]
            .problems
            .iter()
            .any(|p| p.starts_with("spec.http[0].route[0].weight:")),
        "the same field path as pilot apply: {:?}",
        invalid[0].problems
    );
    assert!(
        registry
            .metrics()
            .render()
            .contains("weft_pilot_invalid_objects{kind=\"VirtualService\"} 1\n")
    );

    // The valid one turns invalid: its last valid version stays.
    fake.apply_json(
        VS_V1,
        virtual_service("networking.istio.io/v1", "good", 150),
    );
    eventually("both refused", || registry.invalid().len() == 2).await;
    let good = registry
        .invalid()
        .iter()
        .find(|o| o.key.name == "good")
        .cloned()
        .unwrap();
    assert!(good.previous_in_force);
    assert_eq!(vs_weight(&registry.snapshot(), "good"), Some(80));
    assert!(
        registry
            .metrics()
            .render()
            .contains("weft_pilot_invalid_objects{kind=\"VirtualService\"} 2\n")
    );

    // Fixed: served again, no longer counted.
    fake.apply_json(VS_V1, virtual_service("networking.istio.io/v1", "good", 70));
    eventually("good fixed", || {
        vs_weight(&registry.snapshot(), "good") == Some(70)
    })
    .await;
    assert_eq!(registry.invalid().len(), 1);
    shutdown.cancel();
}

#[tokio::test]
async fn versions_the_cluster_does_not_serve_do_not_hold_the_others_back() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.unserve("apis/networking.istio.io/v1");
    fake.unserve("apis/networking.istio.io/v1alpha3");
    fake.unserve("apis/security.istio.io");
    fake.apply_json(
        &collection("networking.istio.io/v1beta1", "virtualservices"),
        virtual_service("networking.istio.io/v1beta1", "old", 10),
    );
    let (registry, shutdown) = started(&fake, KubeOptions::default()).await;
    assert_eq!(vs_weight(&registry.snapshot(), "old"), Some(10));
    assert!(registry.metrics().events("PeerAuthentication", "error") >= 1);
    shutdown.cancel();
}

fn root_pem() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

#[tokio::test]
async fn the_root_configmap_is_written_to_every_namespace_and_kept_current() {
    const CM: &str = "api/v1/configmaps";
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root.pem");
    let first = root_pem();
    std::fs::write(&root_file, &first).unwrap();
    let fake = FakeApiServer::start().await.unwrap();
    for ns in ["default", "app", "kube-system", "kube-public"] {
        fake.apply(&namespace(ns, json!({})));
    }
    let data = |ns: &str| {
        fake.get(CM, ns, root_configmap::CONFIGMAP_NAME)
            .and_then(|cm| cm.pointer("/data/root-cert.pem").cloned())
            .and_then(|v| v.as_str().map(str::to_string))
    };
    let options = KubeOptions {
        root_file: Some(root_file.clone()),
        root_poll: Some(Duration::from_millis(100)),
    };
    let (_registry, shutdown) = started(&fake, options).await;
    eventually("written to default and app", || {
        data("default").as_deref() == Some(first.as_str())
            && data("app").as_deref() == Some(first.as_str())
    })
    .await;
    assert!(data("kube-system").is_none() && data("kube-public").is_none());
    let applies = fake.requests("PATCH /api/v1/namespaces/app/configmaps/istio-ca-root-cert");
    assert!(
        applies
            .iter()
            .all(|r| r.contains("fieldManager=weft-pilot") && r.contains("force=true")),
        "{applies:?}"
    );

    // Deleted, edited: restored.
    fake.delete(CM, "app", root_configmap::CONFIGMAP_NAME);
    eventually("restored after deletion", || {
        data("app").as_deref() == Some(first.as_str())
    })
    .await;
    let mut edited = fake
        .get(CM, "default", root_configmap::CONFIGMAP_NAME)
        .unwrap();
    edited["data"]["root-cert.pem"] = json!("tampered");
    fake.apply_json(CM, edited);
    eventually("restored after an edit", || {
        data("default").as_deref() == Some(first.as_str())
    })
    .await;

    // A new namespace; a new root.
    fake.apply(&namespace("late", json!({})));
    eventually("written to a new namespace", || {
        data("late").as_deref() == Some(first.as_str())
    })
    .await;
    let second = format!("{first}{}", root_pem());
    std::fs::write(&root_file, &second).unwrap();
    eventually("the new root everywhere", || {
        ["default", "app", "late"]
            .iter()
            .all(|ns| data(ns).as_deref() == Some(second.as_str()))
    })
    .await;
    // A file with no certificate never replaces it.
    std::fs::write(&root_file, "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(data("app").as_deref(), Some(second.as_str()));
    shutdown.cancel();
}

#[tokio::test]
async fn two_replicas_serve_the_same_objects_and_agree_on_the_configmaps() {
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root.pem");
    let pem = root_pem();
    std::fs::write(&root_file, &pem).unwrap();
    let fake = FakeApiServer::start().await.unwrap();
    fake.apply(&namespace("default", json!({})));
    fake.apply(&service("httpbin", "10.96.0.10"));
    fake.apply_json(
        VS_V1,
        virtual_service("networking.istio.io/v1", "split", 30),
    );
    let options = KubeOptions {
        root_file: Some(root_file),
        root_poll: Some(Duration::from_millis(100)),
    };
    let (a, stop_a) = started(&fake, options.clone()).await;
    let (b, stop_b) = started(&fake, options).await;
    let objects = |r: &KubeRegistry| r.snapshot().resources();
    assert_eq!(objects(&a), objects(&b));
    assert_eq!(objects(&a).len(), 2);
    eventually("the ConfigMap written", || {
        fake.get(
            "api/v1/configmaps",
            "default",
            root_configmap::CONFIGMAP_NAME,
        )
        .and_then(|cm| cm.pointer("/data/root-cert.pem").cloned())
        .is_some_and(|v| v == pem.as_str())
    })
    .await;
    // Both replicas see the ConfigMap up to date and leave it alone (no write loop between them).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = fake
        .requests("PATCH /api/v1/namespaces/default/configmaps")
        .len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.requests("PATCH /api/v1/namespaces/default/configmaps")
            .len(),
        writes
    );
    assert!(writes <= 2, "{writes} writes");
    stop_a.cancel();
    stop_b.cancel();
}
