//! Shadow-diff, pilot's half: a real `ca serve` and `pilot serve`, sidecar-side discovery clients
//! over real mTLS that receive the annotated VirtualService's compare and send shadow-diff reports
//! on their streams, and the real `pilot mirror-report` printing them.

use std::time::Duration;

use weft_proto::discovery as pb;
use weft_tests::ControlPlane;
use weft_tests::discovery_client::{DiscoveryStream, node};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");

/// The seed's mirror VirtualService with shadow-diff annotations `compare`.
fn mirror_vs(compare: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
  annotations:
    weft.io/mirror-compare: \"{compare}\"
    weft.io/mirror-compare-ignore-headers: \"X-Served-By\"
spec:
  hosts: [httpbin]
  http:
  - route:
    - destination: {{host: httpbin, subset: v1}}
    mirror: {{host: httpbin, subset: v2}}
"
    )
}

fn compare_of(r: &pb::DiscoveryResponse) -> Option<pb::MirrorCompare> {
    r.config
        .as_ref()?
        .services
        .iter()
        .find(|s| s.hostname == "httpbin.default.svc.cluster.local")?
        .ports
        .first()?
        .routes
        .first()?
        .mirrors
        .first()?
        .compare
        .clone()
}

fn outcomes(pairs: &[(&str, u64)]) -> std::collections::HashMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// What a sidecar that mirrored `n` requests of the seed's route (and `other` of a route of
/// VirtualService shop/reviews) would report: `/status/418` diverges on status.
fn report(n: u64, other: u64, request_id: &str) -> pb::MirrorReport {
    let diverged = n / 4;
    pb::MirrorReport {
        routes: vec![
            pb::RouteCompare {
                route: "default/httpbin/0".into(),
                destination_service: "httpbin.default.svc.cluster.local".into(),
                outcomes: outcomes(&[("match", n - diverged), ("status", diverged)]),
                paths: vec![
                    pb::PathCompare {
                        path: "GET /status/{code}".into(),
                        outcomes: outcomes(&[("status", diverged)]),
                        sample: Some(pb::CompareSample {
                            request_id: request_id.into(),
                            outcome: "status".into(),
                            primary_status: 418,
                            mirror_status: 500,
                            headers: vec![],
                            json_paths: vec![],
                            latency_delta_us: 2_300,
                        }),
                    },
                    pb::PathCompare {
                        path: "GET /get".into(),
                        outcomes: outcomes(&[("match", n - diverged)]),
                        sample: None,
                    },
                ],
                noisy_headers: vec!["etag".into()],
                noisy_json: vec![],
            },
            pb::RouteCompare {
                route: "shop/reviews/0".into(),
                destination_service: "reviews.shop.svc.cluster.local".into(),
                outcomes: outcomes(&[("match", other - 1), ("body", 1)]),
                paths: vec![pb::PathCompare {
                    path: "GET /reviews/{id}".into(),
                    outcomes: outcomes(&[("match", other - 1), ("body", 1)]),
                    sample: Some(pb::CompareSample {
                        request_id: "rev-1".into(),
                        outcome: "body".into(),
                        primary_status: 200,
                        mirror_status: 200,
                        headers: vec![],
                        json_paths: vec!["$.rating".into()],
                        latency_delta_us: -400,
                    }),
                }],
                noisy_headers: vec![],
                noisy_json: vec![],
            },
        ],
    }
}

/// `pilot <args>`, retried until `pred` holds for stdout (reports arrive asynchronously).
async fn pilot_until(plane: &ControlPlane, args: &[&str], pred: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        let (ok, out, err) = plane.pilot_cmd(args).unwrap();
        assert!(ok, "pilot {args:?}: {err}");
        if pred(&out) {
            return out;
        }
        last = format!("{out}{err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pilot {args:?} never matched; last:\n{last}");
}

fn pilot(plane: &ControlPlane, args: &[&str]) -> (String, String) {
    let (ok, out, err) = plane.pilot_cmd(args).unwrap();
    assert!(ok, "pilot {args:?}: {out}{err}");
    (out, err)
}

#[tokio::test]
async fn reports_on_the_config_stream_reach_mirror_report_and_never_disturb_acks() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), &[]).unwrap();
    plane
        .apply(&format!("{EXAMPLES}/httpbin-service.yaml"))
        .unwrap();
    plane.apply(&format!("{EXAMPLES}/all-v1.yaml")).unwrap();
    // An invalid annotation is refused at apply time with its field path; one that does nothing is
    // an analyzer warning.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, mirror_vs("status,x")).unwrap();
    let (ok, out, err) = plane
        .pilot_cmd(&["apply", "-f", &bad.to_string_lossy()])
        .unwrap();
    assert!(!ok, "{out}");
    assert!(
        err.contains(r#"metadata.annotations[weft.io/mirror-compare]: unknown aspect "x", expected status, headers or body"#),
        "{err}"
    );
    let no_mirror = dir.path().join("no-mirror.yaml");
    std::fs::write(
        &no_mirror,
        mirror_vs("status").replace("    mirror: {host: httpbin, subset: v2}\n", ""),
    )
    .unwrap();
    let (ok, out, err) = plane
        .pilot_cmd(&["analyze", "-f", &no_mirror.to_string_lossy()])
        .unwrap();
    assert!(ok, "a warning is below the failure threshold: {out}{err}");
    assert!(
        out.contains("Warning [WFT0001] (VirtualService default/httpbin) annotation weft.io/mirror-compare has no effect"),
        "{out}{err}"
    );
    plane
        .apply_yaml("mirror.yaml", &mirror_vs("status,headers,body"))
        .unwrap();

    // The annotation reaches the sidecar: every mirror carries the compare, with pilot's defaults.
    let mut sleep = DiscoveryStream::open_registered(
        &plane,
        node("sleep-1", "sleep", &[("app", "sleep")], "10.1.0.1"),
    )
    .await
    .unwrap();
    let first = sleep.next_until(|r| compare_of(r).is_some()).await.unwrap();
    let compare = compare_of(&first).unwrap();
    assert!(compare.status && compare.headers && compare.body);
    assert!(compare.ignore_headers.iter().any(|h| h == "date"));
    assert!(
        compare.ignore_headers.iter().any(|h| h == "x-served-by"),
        "lowercased"
    );
    sleep.ack(&first).await.unwrap();
    let status = pilot_until(&plane, &["proxy-status"], |o| o.contains("SYNCED")).await;
    assert!(status.contains("sleep-1"), "{status}");

    // Nothing reported yet: an empty answer, said on stderr.
    let (out, err) = pilot(&plane, &["mirror-report"]);
    assert_eq!(out, "");
    assert!(
        err.contains("No mirror reports for namespace default"),
        "{err}"
    );

    // Two sidecars report; the second then goes away (its report is kept).
    let sleep2 = DiscoveryStream::open_registered(
        &plane,
        node("sleep-2", "sleep", &[("app", "sleep")], "10.1.0.2"),
    )
    .await
    .unwrap();
    sleep.report(report(40, 10, "req-a")).await.unwrap();
    sleep2.report(report(20, 5, "req-b")).await.unwrap();
    let table = pilot_until(&plane, &["mirror-report"], |o| o.contains(" 60 ")).await;
    let expected = "\
ROUTE               DESTINATION                         COMPARED   MATCH RATE   DIVERGENCES
default/httpbin/0   httpbin.default.svc.cluster.local   60         75.0%        status 15

DIVERGING PATHS OF default/httpbin/0
PATH                 COMPARED   DIVERGED   OUTCOMES    SAMPLE REQUEST   STATUS (PRIMARY->MIRROR)   DIFFERS   LATENCY DELTA
GET /status/{code}   15         15         status 15   req-a            418->500                   status    +2.3ms
";
    assert_eq!(
        table, expected,
        "default namespace only, sample of the first pod"
    );
    drop(sleep2);

    // Filters: by VirtualService, by namespace, every namespace.
    let (by_vs, _) = pilot(&plane, &["mirror-report", "httpbin"]);
    assert_eq!(by_vs, expected);
    let (other_vs, err) = pilot(&plane, &["mirror-report", "reviews"]);
    assert_eq!(other_vs, "");
    assert!(err.contains("VirtualService default/reviews"), "{err}");
    let (shop, _) = pilot(&plane, &["mirror-report", "reviews", "-n", "shop"]);
    assert!(
        shop.contains("shop/reviews/0") && !shop.contains("httpbin"),
        "{shop}"
    );
    assert!(
        shop.contains("GET /reviews/{id}")
            && shop.contains("body $.rating")
            && shop.contains("-400us"),
        "{shop}"
    );
    let (all, _) = pilot(&plane, &["mirror-report", "-A"]);
    assert!(
        all.contains("default/httpbin/0") && all.contains("shop/reviews/0"),
        "{all}"
    );
    assert!(
        all.contains("86.7%"),
        "13 of 15 reviews copies matched: {all}"
    );

    // Wide: skipped, sidecars, noise, and the sample's sidecar.
    let (wide, _) = pilot(&plane, &["mirror-report", "-o", "wide"]);
    assert!(
        wide.lines()
            .next()
            .unwrap()
            .ends_with("SKIPPED   SIDECARS   NOISE (IGNORED)"),
        "{wide}"
    );
    assert!(
        wide.contains("status 15     0         2          etag"),
        "{wide}"
    );
    assert!(wide.contains("default/sleep-1"), "{wide}");

    // JSON: the merged structure; sleep-2's report outlives its stream.
    pilot_until(&plane, &["proxy-status"], |o| !o.contains("sleep-2")).await;
    let (json, _) = pilot(&plane, &["mirror-report", "-A", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["sidecars"], 2);
    let route = &v["routes"][0];
    assert_eq!(route["route"], "default/httpbin/0");
    assert_eq!(route["virtual_service"], "default/httpbin");
    assert_eq!(route["compared"], 60);
    assert_eq!(route["matched"], 45);
    assert_eq!(route["outcomes"]["status"], 15);
    assert_eq!(
        route["sidecars"],
        serde_json::json!(["default/sleep-1", "default/sleep-2"])
    );
    assert_eq!(route["paths"][0]["path"], "GET /status/{code}");
    assert_eq!(route["paths"][0]["sample"]["request_id"], "req-a");
    assert_eq!(route["paths"][0]["sample"]["mirror_status"], 500);
    assert_eq!(route["paths"][1]["divergences"], 0);
    assert_eq!(v["routes"][1]["route"], "shop/reviews/0");

    // sleep-2's going changes the mesh's peers (sleep-1 and sleep-2 share an identity, so they
    // are told apart by address): that push is ACKed as any other.
    let without_sleep2 = sleep
        .next_until(|r| {
            r.config
                .as_ref()
                .is_some_and(|c| !c.peers.iter().any(|p| p.workload == "sleep-2"))
        })
        .await
        .unwrap();
    sleep.ack(&without_sleep2).await.unwrap();
    // A report is neither ACK nor NACK: proxy-status stays SYNCED after one, a push answered only
    // by a report stays STALE, and the stream keeps getting pushes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = pilot(&plane, &["proxy-status"]);
    assert!(
        status
            .lines()
            .any(|l| l.contains("sleep-1") && l.contains("SYNCED")),
        "{status}"
    );
    plane
        .apply_yaml("mirror.yaml", &mirror_vs("status"))
        .unwrap();
    let second = sleep
        .next_until(|r| compare_of(r).is_some_and(|c| !c.body))
        .await
        .unwrap();
    assert_ne!(second.version_info, first.version_info);
    sleep.report(report(80, 10, "req-c")).await.unwrap();
    pilot_until(&plane, &["mirror-report"], |o| o.contains(" 100 ")).await;
    let (status, _) = pilot(&plane, &["proxy-status"]);
    assert!(
        status
            .lines()
            .any(|l| l.contains("sleep-1") && l.contains("STALE")),
        "the report did not ACK the push: {status}"
    );
    sleep.ack(&second).await.unwrap();
    let status = pilot_until(&plane, &["proxy-status"], |o| {
        o.lines()
            .any(|l| l.contains("sleep-1") && l.contains("SYNCED"))
    })
    .await;
    assert!(status.contains(&second.version_info), "{status}");
    // And a later change still arrives: the stream is intact.
    plane
        .apply_yaml("mirror.yaml", &mirror_vs("headers"))
        .unwrap();
    let third = sleep
        .next_until(|r| compare_of(r).is_some_and(|c| c.headers && !c.status))
        .await
        .unwrap();
    sleep.ack(&third).await.unwrap();
}
