//! pilot's discovery over real mTLS: a real `ca serve` and `pilot serve` as processes, and
//! sidecar-side gRPC clients (the real discovery proto over the real TLS stack) in the test.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_ca::SpiffeId;
use weft_ca::tls::{self, TrustBundle};
use weft_proto::discovery as pb;
use weft_proto::discovery::discovery_service_client::DiscoveryServiceClient;
use weft_tests::ControlPlane;
use weft_tests::discovery_client::{self, DiscoveryStream, node};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
const V1: &str = "outbound|8000|v1|httpbin.default.svc.cluster.local";
const V2: &str = "outbound|8000|v2|httpbin.default.svc.cluster.local";

/// Opens a discovery stream with a certificate for `default/<cert_sa>`, claiming `node`: pilot's
/// refusal, if it refuses.
async fn open(
    plane: &ControlPlane,
    cert_sa: &str,
    node: pb::Node,
) -> Result<DiscoveryStream, tonic::Status> {
    DiscoveryStream::open(plane, cert_sa, node)
        .await
        .expect("the test's discovery client")
}

/// The same after registering the pod `node` names.
async fn open_registered(
    plane: &ControlPlane,
    cert_sa: &str,
    node: pb::Node,
) -> Result<DiscoveryStream, tonic::Status> {
    discovery_client::register(plane, &node).unwrap();
    open(plane, cert_sa, node).await
}

fn cluster<'a>(r: &'a pb::DiscoveryResponse, name: &str) -> &'a pb::Cluster {
    let cfg = r.config.as_ref().unwrap();
    cfg.clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn httpbin_routes(r: &pb::DiscoveryResponse) -> &[pb::HttpRoute] {
    let cfg = r.config.as_ref().unwrap();
    let svc = cfg
        .services
        .iter()
        .find(|s| s.hostname == "httpbin.default.svc.cluster.local")
        .expect("httpbin service");
    &svc.ports[0].routes
}

fn apply(plane: &ControlPlane, file: &str) {
    let (ok, out, err) = plane
        .pilot_cmd(&["apply", "-f", &format!("{EXAMPLES}/{file}")])
        .unwrap();
    assert!(ok, "apply {file}: {out}{err}");
}

/// proxy-status, retried until `pred` holds for the output (ACKs arrive asynchronously).
async fn proxy_status_until(plane: &ControlPlane, pred: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        let (ok, out, err) = plane.pilot_cmd(&["proxy-status"]).unwrap();
        assert!(ok, "{err}");
        if pred(&out) {
            return out;
        }
        last = out;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("proxy-status never matched; last:\n{last}");
}

#[tokio::test]
async fn snapshot_push_ack_nack_proxy_status_and_workload_lifecycle() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), &["--workload-grace", "1s"]).unwrap();
    apply(&plane, "httpbin-service.yaml");
    apply(&plane, "all-v1.yaml");

    // First snapshot: the seed's all-to-v1 route, and no endpoints yet.
    let mut sleep = open_registered(
        &plane,
        "sleep",
        node("sleep-1", "sleep", &[("app", "sleep")], "10.1.0.1"),
    )
    .await
    .unwrap();
    let has_httpbin = |r: &pb::DiscoveryResponse| {
        r.config
            .as_ref()
            .is_some_and(|c| c.services.iter().any(|s| s.name == "httpbin"))
            && httpbin_routes(r)
                .first()
                .is_some_and(|route| route.destinations.first().is_some_and(|d| d.cluster == V1))
    };
    let first = sleep.next_until(has_httpbin).await.unwrap();
    let routes = httpbin_routes(&first);
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].destinations[0].cluster, V1);
    assert!(routes[0].mirrors.is_empty());
    assert!(cluster(&first, V1).endpoints.is_empty());
    sleep.ack(&first).await.unwrap();
    let status = proxy_status_until(&plane, |o| o.contains("SYNCED")).await;
    assert!(status.starts_with("NAME"), "{status}");
    assert!(
        status.contains("sleep-1") && status.contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "{status}"
    );

    // A change is pushed (after the debounce) and can be NACKed; the NACK shows in proxy-status.
    apply(&plane, "mirror-v2.yaml");
    let second = sleep
        .next_until(|r| !httpbin_routes(r)[0].mirrors.is_empty())
        .await
        .unwrap();
    assert_eq!(httpbin_routes(&second)[0].mirrors[0].cluster, V2);
    assert!(second.version_info != first.version_info);
    sleep
        .nack(&second, &first.version_info, "test rejects this config")
        .await
        .unwrap();
    let status = proxy_status_until(&plane, |o| o.contains("NACKED")).await;
    assert!(
        status.contains("NACKED (test rejects this config)"),
        "{status}"
    );
    // The version the sidecar reported is its last column, as istioctl's VERSION.
    assert!(
        status
            .lines()
            .next()
            .is_some_and(|h| h.ends_with("VERSION")),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.contains("NACKED") && l.ends_with("0.0.0-test")),
        "{status}"
    );

    // A workload registers through its own stream and becomes an endpoint of the right subsets.
    let v1 = open_registered(
        &plane,
        "httpbin",
        node(
            "httpbin-v1",
            "httpbin",
            &[("app", "httpbin"), ("version", "v1")],
            "10.1.0.2",
        ),
    )
    .await
    .unwrap();
    let third = sleep
        .next_until(|r| !cluster(r, V1).endpoints.is_empty())
        .await
        .unwrap();
    let eps = &cluster(&third, V1).endpoints;
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].address, "10.1.0.2");
    assert_eq!(
        eps[0].identity,
        "spiffe://cluster.local/ns/default/sa/httpbin"
    );
    assert!(cluster(&third, V2).endpoints.is_empty());
    sleep.ack(&third).await.unwrap();

    // Its stream ends: after the grace period the endpoint is gone.
    drop(v1);
    let fourth = sleep
        .next_until(|r| cluster(r, V1).endpoints.is_empty())
        .await
        .unwrap();
    assert!(cluster(&fourth, V1).endpoints.is_empty());
}

#[tokio::test]
async fn refuses_a_node_that_claims_another_identity() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), &[]).unwrap();
    let Err(status) = open(
        &plane,
        "sleep",
        node("evil", "httpbin", &[("app", "httpbin")], "10.1.0.9"),
    )
    .await
    else {
        panic!("pilot accepted a node claiming another service account");
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("spiffe://cluster.local/ns/default/sa/sleep")
            && status.message().contains("\"httpbin\""),
        "{}",
        status.message()
    );
    // Nothing registered: proxy-status shows the refusal, and why.
    let (ok, out, _) = plane.pilot_cmd(&["proxy-status"]).unwrap();
    assert!(ok);
    let line = out.lines().find(|l| l.contains("evil")).unwrap_or_default();
    assert!(
        line.contains("REFUSED (client certificate is spiffe://cluster.local/ns/default/sa/sleep"),
        "{out}"
    );
}

/// The registry rule (issue 16): a sidecar is the platform's Pod it names, or nothing. The issue's
/// case first: a sidecar of service account `sleep` claiming `app=echo` used to become an endpoint
/// of the echo Service.
#[tokio::test]
async fn a_sidecar_claiming_another_pod_labels_or_service_account_is_refused() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), &[]).unwrap();
    plane
        .apply_yaml(
            "echo.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\nspec:\n  selector:\n    \
             app: echo\n  ports:\n  - name: http\n    port: 80\n",
        )
        .unwrap();
    plane
        .register_pod("echo-1", "echo", "app=echo", "10.1.0.7")
        .unwrap();
    plane
        .register_pod("sleep-1", "sleep", "app=sleep", "10.1.0.9")
        .unwrap();

    let cases = [
        // Its own pod, another pod's labels.
        (
            "sleep",
            node("sleep-1", "sleep", &[("app", "echo")], "10.1.0.9"),
            "the sidecar claims label app=echo, but pod default/sleep-1 has app=sleep",
        ),
        // Another pod, with that pod's claims: the certificate is not the pod's service account.
        (
            "sleep",
            node("echo-1", "sleep", &[("app", "echo")], "10.1.0.7"),
            "pod default/echo-1 runs as service account \"echo\"",
        ),
        // Its own pod at another address.
        (
            "sleep",
            node("sleep-1", "sleep", &[], "10.1.0.7"),
            "the sidecar claims IP \"10.1.0.7\", but pod default/sleep-1 has 10.1.0.9",
        ),
        // A pod nobody registered.
        (
            "sleep",
            node("sleep-2", "sleep", &[("app", "sleep")], "10.1.0.9"),
            "no pod default/sleep-2 is registered",
        ),
    ];
    for (cert_sa, claimed, want) in cases {
        let name = claimed.name.clone();
        let Err(status) = open(&plane, cert_sa, claimed).await else {
            panic!("pilot admitted {name}, expected: {want}");
        };
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(want), "{}", status.message());
        let out = proxy_status_until(&plane, |o| o.contains(want)).await;
        let line = out.lines().find(|l| l.contains(want)).unwrap_or_default();
        assert!(line.contains("REFUSED"), "{out}");
    }

    // The echo Service still has no endpoint: a stream of its own pod shows the Service without
    // the refused claimants (its pod is not connected), then with it once it is.
    let mut echo = open(
        &plane,
        "echo",
        node("echo-1", "echo", &[("app", "echo")], "10.1.0.7"),
    )
    .await
    .unwrap();
    let echo_cluster = "outbound|80||echo.default.svc.cluster.local";
    let with_echo = echo
        .next_until(|r| {
            r.config.as_ref().is_some_and(|c| {
                c.clusters
                    .iter()
                    .any(|c| c.name == echo_cluster && !c.endpoints.is_empty())
            })
        })
        .await
        .unwrap();
    let eps = &cluster(&with_echo, echo_cluster).endpoints;
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0].address, "10.1.0.7");
    assert_eq!(eps[0].identity, "spiffe://cluster.local/ns/default/sa/echo");
    // Admitted: its refusal (none here) is gone and it is SYNCED once it ACKs.
    echo.ack(&with_echo).await.unwrap();
    proxy_status_until(&plane, |o| {
        o.lines()
            .any(|l| l.starts_with("echo-1") && l.contains("SYNCED"))
    })
    .await;
}

/// The same with the real sidecar binary: claiming labels its pod does not have, it never gets a
/// config (never ready) and `proxy-status` says why; with the insecure opt-in it is admitted.
#[tokio::test]
async fn a_real_sidecar_claiming_labels_is_refused_unless_claims_are_trusted() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), &[]).unwrap();
    plane
        .register_pod("sleep-1", "sleep", "app=sleep", "127.0.0.1")
        .unwrap();
    let mut sidecar =
        weft_tests::Sidecar::spawn_unregistered(&plane, "sleep-1", "sleep", "app=echo").unwrap();
    let out = proxy_status_until(&plane, |o| o.contains("REFUSED")).await;
    assert!(
        out.contains("the sidecar claims label app=echo, but pod default/sleep-1 has app=sleep"),
        "{out}"
    );
    assert_ne!(
        sidecar.ready_status().unwrap(),
        200,
        "a refused sidecar is not ready"
    );
    sidecar.proc.kill().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let trusting = ControlPlane::start(dir.path(), &["--trust-workload-claims"]).unwrap();
    let sidecar =
        weft_tests::Sidecar::spawn_unregistered(&trusting, "sleep-1", "sleep", "app=echo").unwrap();
    sidecar.wait_ready().unwrap();
}

#[tokio::test]
async fn refuses_clients_without_a_mesh_certificate() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), &[]).unwrap();
    let root = std::fs::read_to_string(&plane.root).unwrap();
    let bundle = TrustBundle::from_pem(&root).unwrap();
    let pilot_id = SpiffeId::new("cluster.local", "weft-system", "pilot").unwrap();
    let cfg = tls::client_config(None, &bundle, vec![pilot_id], &[tls::ALPN_H2]).unwrap();
    let channel =
        weft_ca::grpc::tls_channel(&plane.discovery_addr, Arc::new(cfg), &Default::default())
            .unwrap();
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::DiscoveryRequest {
        node: Some(node("anon", "sleep", &[], "10.1.0.5")),
        ..Default::default()
    })
    .await
    .unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        DiscoveryServiceClient::new(channel).stream_config(ReceiverStream::new(rx)),
    )
    .await
    .expect("bounded");
    let status = result.expect_err("pilot accepted a client without a certificate");
    assert_ne!(status.code(), tonic::Code::Ok);
}
