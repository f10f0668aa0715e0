//! Chaos: a server-side sidecar killed with SIGKILL under load. Clients must get an error quickly
//! (never a hang) while it is gone, and traffic must come back on its own once it is restarted. Real
//! CA, pilot, sidecars and httpbin (gunicorn) as processes on loopback; the client is curl through
//! sleep's sidecar, as the seed's sleep pod does.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use weft_tests::Sidecar;
use weft_tests::seed::{Seed, has_vs_route};

/// The longest any request may take, outage or not: an error must be fast, not a timeout.
const FAST: Duration = Duration::from_secs(2);
/// How long v1's sidecar stays dead with requests flowing.
const OUTAGE: Duration = Duration::from_secs(3);
/// How long traffic may take to come back once the new sidecar is ready.
const RECOVERY: Duration = Duration::from_secs(30);
/// Bounds of the client loop, whatever happens.
const LOOP_MAX_REQUESTS: usize = 3000;
const LOOP_MAX_TIME: Duration = Duration::from_secs(90);

/// One request of the client loop.
#[derive(Debug)]
struct Sent {
    at: Instant,
    took: Duration,
    /// The status, or curl's failure (connection error, timeout).
    outcome: Result<u16, String>,
}

/// Sends `GET /get` to httpbin through the sidecar at `outbound`, one after another, until `stop`
/// (or the loop's bounds). curl's own limit is well past [`FAST`] so that a hang shows as a slow
/// request instead of being cut to look fast.
fn client_loop(outbound: String, stop: Arc<AtomicBool>) -> Vec<Sent> {
    let begun = Instant::now();
    let mut sent = Vec::new();
    while !stop.load(Ordering::Relaxed)
        && sent.len() < LOOP_MAX_REQUESTS
        && begun.elapsed() < LOOP_MAX_TIME
    {
        let at = Instant::now();
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10"])
            .args(["-x", &format!("http://{outbound}")])
            .arg("http://httpbin:8000/get")
            .output();
        let took = at.elapsed();
        let outcome = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u16>()
                .map_err(|e| format!("bad status {:?}: {e}", o.stdout)),
            Ok(o) => Err(format!("curl exit {:?}", o.status.code())),
            Err(e) => Err(format!("spawn curl: {e}")),
        };
        sent.push(Sent { at, took, outcome });
    }
    sent
}

#[test]
fn kill_9_of_a_server_side_sidecar_fails_requests_fast_then_traffic_recovers() {
    let mut m = Seed::explicit(&[]).unwrap();
    m.apply("all-v1.yaml").unwrap();
    m.wait_routes("all-v1 is in force", has_vs_route).unwrap();
    assert_eq!(m.send(5, &[]).unwrap(), (5, 0), "before the kill");

    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (outbound, stop) = (m.sleep.outbound.clone(), stop.clone());
        std::thread::spawn(move || client_loop(outbound, stop))
    };
    // Let the loop get going so the kill lands under load.
    std::thread::sleep(Duration::from_millis(500));

    m.sidecars[0].proc.kill().unwrap();
    let killed = Instant::now();
    std::thread::sleep(OUTAGE);
    let restarting = Instant::now();
    let v1_port = m.v1.port;
    m.sidecars[0] = Sidecar::explicit(
        &m.plane,
        "httpbin-v1",
        "httpbin",
        "app=httpbin,version=v1",
        Some(v1_port),
        &[],
    )
    .unwrap();
    let ready = Instant::now();
    // Wait (bounded) until the loop has a success that started after the new sidecar was ready.
    let recovered = loop {
        let first_ok = m.sleep.curl("http://httpbin:8000/get", &[]).ok();
        if matches!(first_ok, Some((200, _))) {
            break Some(ready.elapsed());
        }
        if ready.elapsed() > RECOVERY {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stop.store(true, Ordering::Relaxed);
    let sent = client.join().unwrap();

    let recovered = recovered.unwrap_or_else(|| {
        panic!(
            "traffic did not recover within {RECOVERY:?} of v1's sidecar being back; sleep's \
             sidecar:\n{}",
            m.sleep.proc.stderr_tail()
        )
    });
    // Every request, before, during and after the outage, answered quickly, with a status.
    let slow: Vec<&Sent> = sent.iter().filter(|s| s.took > FAST).collect();
    assert!(slow.is_empty(), "requests slower than {FAST:?}: {slow:#?}");
    let unanswered: Vec<&Sent> = sent.iter().filter(|s| s.outcome.is_err()).collect();
    assert!(
        unanswered.is_empty(),
        "requests without an HTTP answer: {unanswered:#?}"
    );
    // While v1's sidecar was dead, every request failed, as a gateway error: all traffic goes to v1.
    let during: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.at >= killed && s.at + s.took <= restarting)
        .collect();
    assert!(
        during.len() >= 10,
        "only {} requests during the outage",
        during.len()
    );
    let not_gateway_errors: Vec<&Sent> = during
        .iter()
        .copied()
        .filter(|s| !matches!(s.outcome, Ok(502 | 503)))
        .collect();
    assert!(
        not_gateway_errors.is_empty(),
        "during the outage, answers other than 502/503: {not_gateway_errors:#?}"
    );
    // And traffic is whole again: 20 requests in a row succeed, all served by v1.
    assert_eq!(m.send(20, &[]).unwrap(), (20, 0), "after the restart");
    eprintln!(
        "kill -9 chaos: {} requests, {} during the outage (slowest {:?}), recovered {:?} after the \
         new sidecar was ready",
        sent.len(),
        during.len(),
        during.iter().map(|s| s.took).max().unwrap_or_default(),
        recovered
    );
}

/// pilot restarted (SIGTERM, then SIGKILL) under a client loop: no request fails. The restarted
/// pilot's registry of live workloads starts empty; its first pushes wait for the sidecars to
/// reconnect (`--warm-up`), instead of sending a config without endpoints (the soak's 503s).
#[test]
fn a_pilot_restart_under_load_fails_no_request() {
    let mut m = Seed::explicit(&[]).unwrap();
    m.apply("all-v1.yaml").unwrap();
    m.wait_routes("the all-to-v1 route is in", weft_tests::seed::has_vs_route)
        .unwrap();
    for (generation, how) in [
        (1, weft_tests::chaos::Stop::Term(Duration::from_secs(10))),
        (2, weft_tests::chaos::Stop::Kill),
    ] {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let outbound = m.sleep.outbound.clone();
        let looping = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut sent, mut failed) = (0, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    let reply = weft_tests::raw_http::exchange_head(
                        &outbound,
                        b"GET http://httpbin:8000/get HTTP/1.1\r\nHost: httpbin:8000\r\nConnection: close\r\n\r\n",
                        Duration::from_secs(10),
                    )
                    .unwrap();
                    sent += 1;
                    if reply.status() != Some(200) {
                        failed.push(reply.text());
                    }
                }
                (sent, failed)
            })
        };
        std::thread::sleep(Duration::from_millis(500));
        weft_tests::chaos::restart_pilot(&mut m.plane, &[], how, generation).unwrap();
        // The sidecars reconnect and get their config again; traffic runs on through it.
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (sent, failed) = looping.join().unwrap();
        assert!(sent > 20, "only {sent} requests");
        assert!(
            failed.is_empty(),
            "{} of {sent} failed: {:?}",
            failed.len(),
            failed.first()
        );
    }
    // The restarted pilot has every sidecar back.
    let (ok, out, err) = m.plane.pilot_cmd(&["proxy-status"]).unwrap();
    assert!(ok, "{err}");
    for pod in ["httpbin-v1", "httpbin-v2", "sleep"] {
        assert!(out.contains(pod), "{out}");
    }
}
