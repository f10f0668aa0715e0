//! The data plane staying up while its inputs change under it: certificates rotating under continuous
//! traffic, and a control plane that pushes bad config, goes away and comes back. Real CA, real
//! sidecars and real httpbin (gunicorn) as processes on loopback; the bad pushes come from an in-test
//! fake pilot (a real pilot validates config and never sends one).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use weft_ca::SpiffeId;
use weft_proto::discovery as pb;
use weft_tests::fake_pilot::{FakePilot, simple_config};
use weft_tests::seed::Seed;
use weft_tests::{ControlPlane, Httpbin, Sidecar};

/// `--cert-ttl` for the rotation test: rotation at about half life, so every ~2 s.
const TTL: &str = "4s";
/// How long traffic runs: about four rotation periods.
const TRAFFIC_FOR: Duration = Duration::from_secs(9);

#[test]
fn certificate_rotation_under_continuous_traffic_fails_no_request() {
    let m = Seed::explicit_with(&[], &["--cert-ttl", TTL]).unwrap();
    let httpbin = SpiffeId::new("cluster.local", "default", "httpbin").unwrap();
    let root = m.plane.root.clone();
    let rotated_before: Vec<usize> = std::iter::once(&m.sleep)
        .chain(&m.sidecars)
        .map(|s| s.log_count("certificate rotated"))
        .collect();

    let mut ok = 0usize;
    let mut failures = Vec::new();
    // What each httpbin sidecar serves to a fresh handshake, sampled through the run.
    let mut served: Vec<HashSet<Vec<u8>>> = vec![HashSet::new(); m.sidecars.len()];
    let mut expiry = Vec::new();
    let mut handshake_failures = Vec::new();
    let start = Instant::now();
    let mut next_sample = start;
    for i in 0..5000 {
        if start.elapsed() > TRAFFIC_FOR {
            break;
        }
        match m.sleep.curl("http://httpbin:8000/get", &[]) {
            Ok((200, _)) => ok += 1,
            Ok((code, body)) => failures.push(format!("request {i}: {code} {body}")),
            Err(e) => failures.push(format!("request {i}: {e:#}")),
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_millis(250);
            expiry.push(m.sleep.stat("weft_cert_expiry_seconds").unwrap());
            for (n, s) in m.sidecars.iter().enumerate() {
                match s.inbound_certificate(&root, &httpbin) {
                    Ok(leaf) => {
                        served[n].insert(leaf);
                    }
                    Err(e) => {
                        handshake_failures.push(format!("{n} at {:?}: {e:#}", start.elapsed()))
                    }
                }
            }
        }
    }

    assert!(
        failures.is_empty(),
        "{} of {} requests failed during rotation: {:#?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(ok >= 20, "only {ok} requests in {TRAFFIC_FOR:?}");
    assert!(
        handshake_failures.is_empty(),
        "new handshakes failed during rotation: {handshake_failures:#?}"
    );
    // Rotation really happened, seen three ways: the expiry gauge climbing back up, a new leaf on
    // every new handshake after each rotation, and the sidecars' own log.
    let rises = expiry.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        rises >= 2,
        "weft_cert_expiry_seconds rose {rises} times (samples {expiry:?})"
    );
    for (n, leaves) in served.iter().enumerate() {
        assert!(
            leaves.len() >= 3,
            "httpbin sidecar {n} served {} distinct certificates in {TRAFFIC_FOR:?}",
            leaves.len()
        );
    }
    for (s, before) in std::iter::once(&m.sleep)
        .chain(&m.sidecars)
        .zip(rotated_before)
    {
        let rotations = s.log_count("certificate rotated") - before;
        assert!(rotations >= 2, "a sidecar rotated {rotations} times");
    }
}

const WAIT: Duration = Duration::from_secs(20);

/// Sends `n` requests for `/get` through `client` (each must answer 200); returns how many lines
/// the access logs of `a` and `b` grew by.
fn send(client: &Sidecar, a: &Httpbin, b: &Httpbin, n: usize) -> (usize, usize) {
    let (a0, b0) = (a.log_lines().len(), b.log_lines().len());
    for _ in 0..n {
        let (code, body) = client.curl("http://httpbin:8000/get", &[]).unwrap();
        assert_eq!(code, 200, "{body}");
    }
    // gunicorn logs after answering: wait (bounded) for the last lines.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (da, db) = (a.log_lines().len() - a0, b.log_lines().len() - b0);
        if da + db >= n || Instant::now() > deadline {
            return (da, db);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dump_version(s: &Sidecar) -> String {
    let dump: serde_json::Value = serde_json::from_str(&s.config_dump().unwrap()).unwrap();
    dump["version"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn invalid_push_is_nacked_old_routes_kept_and_pilot_restart_is_survived() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), &[]).unwrap();
    let a = Httpbin::start(dir.path(), "app-a").unwrap();
    let b = Httpbin::start(dir.path(), "app-b").unwrap();
    let to_a = simple_config("httpbin", 8000, &[("127.0.0.1", a.port, "")]);
    let to_b = simple_config("httpbin", 8000, &[("127.0.0.1", b.port, "")]);

    // Version 1: httpbin is app A. The sidecar connects, sends its node, ACKs, becomes ready.
    let pilot = FakePilot::start(&plane).unwrap();
    let addr = pilot.addr;
    let n1 = pilot.push("1", to_a.clone());
    let client = Sidecar::explicit_with_pilot(
        &plane,
        &addr.to_string(),
        "client",
        "sleep",
        "app=sleep",
        None,
        &[],
    )
    .unwrap();
    let hello = pilot.wait_node(WAIT).unwrap();
    let node = hello.request.node.as_ref().unwrap();
    assert_eq!(
        (node.name.as_str(), node.service_account.as_str()),
        ("client", "sleep")
    );
    assert_eq!(
        hello.request.version_info, "",
        "a fresh sidecar has no version"
    );
    let ack = pilot.reply_to(&n1, WAIT).unwrap();
    assert!(!ack.is_nack(), "NACKed a valid config: {}", ack.error());
    assert_eq!(ack.request.version_info, "1");
    assert_eq!(send(&client, &a, &b, 3), (3, 0));

    // Version 2 is invalid (its route names a cluster the push lacks) and would send traffic to B.
    let mut bad = to_b.clone();
    let unknown = "outbound|8000|nosuch|httpbin.default.svc.cluster.local";
    bad.services[0].ports[0].routes[0].destinations[0].cluster = unknown.into();
    let n2 = pilot.push("2", bad);
    let nack = pilot.reply_to(&n2, WAIT).unwrap();
    assert!(nack.is_nack(), "ACKed a route to an unknown cluster");
    assert!(
        nack.error().contains(unknown) && nack.error().contains("unknown cluster"),
        "NACK message does not name the problem: {:?}",
        nack.error()
    );
    assert_eq!(
        nack.request.version_info, "1",
        "a NACK carries the last good version"
    );
    assert_eq!(dump_version(&client), "1");
    assert_eq!(
        send(&client, &a, &b, 5),
        (5, 0),
        "the last good routes must stay in force"
    );
    assert_eq!(client.stat("weft_config_nacks_total").unwrap(), 1.0);
    assert_eq!(client.stat("weft_config_version").unwrap(), 1.0);

    // Version 3 is invalid another way (a regex that does not compile): NACKed too.
    let mut bad = to_b.clone();
    bad.services[0].ports[0].routes[0].matches = vec![pb::HttpMatch {
        uri: Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Regex("/get(".into())),
        }),
        ..Default::default()
    }];
    let n3 = pilot.push("3", bad);
    let nack = pilot.reply_to(&n3, WAIT).unwrap();
    assert!(nack.is_nack(), "ACKed a route with a bad regex");
    assert!(
        nack.error().contains("regex") && nack.error().contains("/get("),
        "{:?}",
        nack.error()
    );
    assert_eq!(nack.request.version_info, "1");
    assert_eq!(client.stat("weft_config_nacks_total").unwrap(), 2.0);
    assert_eq!(send(&client, &a, &b, 3), (3, 0));

    // pilot goes away: the sidecar notices (it starts retrying) and keeps serving version 1.
    let connects = client.stat("weft_control_connects_total").unwrap();
    let failed_before = client.log_count("discovery stream failed");
    pilot.stop();
    let deadline = Instant::now() + WAIT;
    while client.log_count("discovery stream failed") == failed_before {
        assert!(
            Instant::now() < deadline,
            "the sidecar never noticed pilot was gone:\n{}",
            client.proc.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(send(&client, &a, &b, 5), (5, 0), "served without pilot");
    client.wait_ready().unwrap();

    // pilot comes back on the same address: the sidecar reconnects (bounded wait), tells it the
    // version it runs, and applies the next push (B).
    let pilot = FakePilot::start_at(&plane, addr).unwrap();
    let hello = pilot.wait_node(Duration::from_secs(40)).unwrap();
    assert_eq!(hello.request.version_info, "1");
    let n4 = pilot.push("4", to_b);
    let ack = pilot.reply_to(&n4, WAIT).unwrap();
    assert!(!ack.is_nack(), "{}", ack.error());
    assert_eq!(ack.request.version_info, "4");
    assert_eq!(dump_version(&client), "4");
    assert_eq!(send(&client, &a, &b, 3), (0, 3), "the new push is in force");
    assert!(client.stat("weft_control_connects_total").unwrap() > connects);
    assert_eq!(client.stat("weft_config_nacks_total").unwrap(), 2.0);
}
