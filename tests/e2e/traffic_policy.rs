//! Resilience as Istio promises it (issue 18), end to end in explicit mode: Istio YAML through the
//! real `pilot apply`, real curl through the client (sleep) sidecar, the real httpbin under gunicorn
//! as the app. What happened is read where an operator would read it: httpbin's access log (how many
//! tries reached the app), the client sidecar's Envoy-format access log (response flags) and the
//! sidecars' `/stats/prometheus`.
//!
//! gunicorn runs one sync worker per httpbin: requests to one endpoint are served one at a time, so
//! waits on the app's log allow for a slow request ahead in its queue.

use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use weft_tests::seed::{DEFAULT_CLUSTER, Seed};
use weft_tests::{Httpbin, Proc, Sidecar};

/// The counter of outlier ejections on the client sidecar's `/stats/prometheus` (summed over its
/// labels, if any).
const EJECTIONS_METRIC: &str = "weft_outlier_ejections_total";
/// What the client sidecar's log line for one ejection contains (stderr; the message of
/// `outbound/send.rs`'s `report_outlier` on main).
const EJECTION_LOG: &str = "outlier detection ejected an endpoint";

/// A VirtualService for httpbin with one rule to the whole Service; `rule` is YAML indented to sit
/// beside `route:` in the rule (four spaces), e.g. `    timeout: 1s\n`.
fn virtual_service(rule: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: httpbin\nspec:\n  hosts:\n  - httpbin\n  http:\n  - route:\n    - destination:\n        host: httpbin\n{rule}"
    )
}

/// A DestinationRule for httpbin whose `trafficPolicy` is `policy` (YAML indented four spaces).
fn destination_rule(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: httpbin\nspec:\n  host: httpbin\n  trafficPolicy:\n{policy}"
    )
}

/// The config version sleep's sidecar runs.
fn version(m: &Seed) -> serde_json::Value {
    let dump: serde_json::Value = serde_json::from_str(&m.sleep.config_dump().unwrap()).unwrap();
    dump["version"].clone()
}

/// `pilot apply` of `yaml`, then waits (bounded) until sleep's sidecar runs a newer config. pilot
/// pushes only when what a sidecar gets changed, so each call must change something.
fn apply(m: &Seed, name: &str, yaml: &str) {
    let before = version(m);
    m.apply_yaml(name, yaml)
        .unwrap_or_else(|e| panic!("pilot apply refused {name}: {e:#}\n{yaml}"));
    m.wait_config(
        &format!("{name} is in force (version past {before})"),
        |d| d["version"] != before,
    )
    .unwrap();
}

/// `pilot delete <kind> httpbin`, then waits until sleep's sidecar runs the config without it.
fn delete(m: &Seed, kind: &str) {
    let before = version(m);
    let (ok, out, err) = m.plane.pilot_cmd(&["delete", kind, "httpbin"]).unwrap();
    assert!(ok, "pilot delete {kind} httpbin: {out}{err}");
    m.wait_config(&format!("{kind} httpbin is gone"), |d| {
        d["version"] != before
    })
    .unwrap();
}

/// One answer as curl saw it.
#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    /// curl's own `time_total` (process start-up not included).
    secs: f64,
    /// Status line and headers, lowercased.
    head: String,
    body: String,
}

impl Reply {
    fn overloaded(&self) -> bool {
        self.head.contains("x-envoy-overloaded: true")
    }
}

/// `GET http://httpbin:8000{path}` with real curl through the sidecar whose outbound listener is
/// `outbound` (explicit mode: the sidecar is curl's HTTP proxy).
fn curl_via(outbound: &str, path: &str) -> Reply {
    curl_with(outbound, &format!("http://httpbin:8000{path}"), &[])
}

/// `url` with real curl through the sidecar whose outbound listener is `outbound`, with `extra`
/// curl arguments (e.g. a body to POST).
fn curl_with(outbound: &str, url: &str, extra: &[&str]) -> Reply {
    let (ok, out, err) = weft_tests::run(
        Command::new("curl")
            .args([
                "-x",
                &format!("http://{outbound}"),
                "-s",
                "-i",
                "-m",
                "15",
                "-w",
                "\n%{http_code} %{time_total}",
            ])
            .args(extra)
            .arg(url),
    )
    .unwrap();
    assert!(ok, "curl {url} failed: {err}");
    let (text, tail) = out.rsplit_once('\n').unwrap_or(("", &out));
    let mut tail = tail.split_whitespace();
    let code = tail.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let secs = tail.next().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    Reply {
        code,
        secs,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn curl(m: &Seed, path: &str) -> Reply {
    curl_via(&m.sleep.outbound, path)
}

/// [`curl`], failing unless the answer is `code`.
fn expect(m: &Seed, path: &str, code: u16) -> Reply {
    let r = curl(m, path);
    assert_eq!(
        r.code, code,
        "GET {path}: want {code}, got {} after {:.3} s:\n{}\n\n{}",
        r.code, r.secs, r.head, r.body
    );
    r
}

/// How many requests (any method) for `path` the apps logged: waits (bounded by `within`) until at least `want`
/// arrived, then a moment longer so that extra ones (a retry too many) show too.
fn app_hits(apps: &[&Httpbin], path: &str, want: usize, within: Duration) -> usize {
    let needle = format!(" {path} HTTP/1.1\"");
    let count = || -> usize {
        apps.iter()
            .map(|a| a.log_lines().iter().filter(|l| l.contains(&needle)).count())
            .sum()
    };
    let deadline = Instant::now() + within;
    while count() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(400));
    count()
}

/// Both httpbins of the seed.
fn apps(m: &Seed) -> [&Httpbin; 2] {
    [&m.v1, &m.v2]
}

/// Waits (bounded) until `sidecar`'s access log (stdout) has a line for `GET {path}`; returns it.
fn access_line(sidecar: &Sidecar, path: &str) -> String {
    let needle = format!("\"GET {path} HTTP/1.1\"");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = sidecar.proc.stdout_lines();
        if let Some(l) = lines.iter().find(|l| l.contains(&needle)) {
            return l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no access-log line for GET {path} in:\n{}",
            lines.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The response flags of an Envoy text access-log line (the field after the status code), split on
/// commas (Envoy prints several as `UT,URX`).
fn flags(line: &str) -> Vec<String> {
    line.split_once("\" ")
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split_whitespace().nth(1))
        .unwrap_or_default()
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// The sum of the `istio_requests_total` samples whose labels contain every one of `must`.
fn requests_total(text: &str, must: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{") && must.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The sum of every sample of counter `name` (with or without labels).
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Connections the httpbin sidecars' inbound listeners have accepted and seen closed, summed over
/// both (`weft_listener_connections_{opened,closed}_total{listener="inbound"}`; HTTP connections
/// count there, not in `istio_tcp_*`): every one comes from sleep's sidecar, the only client in
/// the test.
fn inbound_connections(m: &Seed) -> (f64, f64) {
    m.sidecars.iter().fold((0.0, 0.0), |(o, c), s| {
        let text = s.stats().unwrap();
        let sample = |name: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}{{listener=\"inbound\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        (
            o + sample("weft_listener_connections_opened_total"),
            c + sample("weft_listener_connections_closed_total"),
        )
    })
}

fn seed() -> Seed {
    Seed::explicit(&[]).unwrap()
}

#[test]
fn retries_follow_attempts_retry_on_and_istio_default_policy() {
    let m = seed();
    let apps = apps(&m);
    let within = Duration::from_secs(5);

    // No VirtualService: Istio's default policy, 2 retries on retriable-status-codes (503) among
    // others, so a 503 is tried 3 times and a 500 once.
    expect(&m, "/status/503?step=default", 503);
    let n = app_hits(&apps, "/status/503?step=default", 3, within);
    assert_eq!(
        n, 3,
        "default policy: /status/503 should reach httpbin 3 times (1 + 2 retries), saw {n}"
    );
    expect(&m, "/status/500?step=default", 500);
    let n = app_hits(&apps, "/status/500?step=default", 1, within);
    assert_eq!(
        n, 1,
        "default policy: a 500 is not retriable (only 503), yet httpbin saw it {n} times"
    );

    // attempts: 3 on 5xx: 1 + 3 tries, the last answer (503) reaches the caller, and retries prefer
    // another endpoint (Istio's previous_hosts predicate), so both httpbins see it.
    apply(
        &m,
        "retry-5xx.yaml",
        &virtual_service("    retries:\n      attempts: 3\n      retryOn: 5xx\n"),
    );
    let (v1_before, v2_before) = (m.v1.log_lines().len(), m.v2.log_lines().len());
    // After the retries the caller gets the last answer, the 503.
    expect(&m, "/status/503?step=5xx", 503);
    let n = app_hits(&apps, "/status/503?step=5xx", 4, within);
    assert_eq!(n, 4, "attempts: 3 on 5xx: want 4 tries at httpbin, saw {n}");
    assert!(
        m.v1.log_lines().len() > v1_before && m.v2.log_lines().len() > v2_before,
        "retries should go to another endpoint: v1 grew by {}, v2 by {}",
        m.v1.log_lines().len() - v1_before,
        m.v2.log_lines().len() - v2_before
    );

    // retryOn: gateway-error retries 502/503/504 only: a 500 is made once, a 502 four times.
    apply(
        &m,
        "retry-gw.yaml",
        &virtual_service("    retries:\n      attempts: 3\n      retryOn: gateway-error\n"),
    );
    expect(&m, "/status/500?step=gw", 500);
    let n = app_hits(&apps, "/status/500?step=gw", 1, within);
    assert_eq!(
        n, 1,
        "gateway-error does not cover 500: want 1 try, saw {n}"
    );
    expect(&m, "/status/502?step=gw", 502);
    let n = app_hits(&apps, "/status/502?step=gw", 4, within);
    assert_eq!(n, 4, "gateway-error covers 502: want 4 tries, saw {n}");

    // attempts: 0 turns retries off, the default policy included.
    apply(
        &m,
        "retry-off.yaml",
        &virtual_service("    retries:\n      attempts: 0\n"),
    );
    expect(&m, "/status/503?step=off", 503);
    let n = app_hits(&apps, "/status/503?step=off", 1, within);
    assert_eq!(n, 1, "attempts: 0: want 1 try, saw {n}");

    // Last, so that the behaviour above is judged first: the flag of exhausted retries.
    let line = access_line(&m.sleep, "/status/503?step=5xx");
    assert!(
        flags(&line).iter().any(|f| f == "URX"),
        "retries exhausted on an upstream 503: Envoy's flag URX expected in {line:?}"
    );
}

#[test]
fn per_try_timeout_retries_a_slow_answer_then_gives_up_with_504_ut() {
    let m = seed();
    // Envoy retries a per-try timeout as a reset of its own making: under `5xx`, `gateway-error`
    // or `reset` (router.cc `onPerTryTimeoutCommon` -> `maybeRetryReset`, retry_state_impl.cc
    // `wouldRetryFromReset`). The route timeout (5 s) bounds the whole.
    apply(
        &m,
        "per-try.yaml",
        &virtual_service(
            "    timeout: 5s\n    retries:\n      attempts: 2\n      perTryTimeout: 500ms\n      retryOn: 5xx\n",
        ),
    );
    let r = curl(&m, "/delay/2?step=per-try");
    assert_eq!(
        r.code, 504,
        "three tries of 500 ms against a 2 s answer end in 504: {r:?}"
    );
    // 3 x 500 ms plus two jittered backoffs (25 ms base); never the 5 s route timeout, never the
    // 2 s answer of a single untimed try.
    assert!(
        (1.45..3.0).contains(&r.secs),
        "want 504 after about 1.5 s (3 tries of 500 ms), took {:.3} s",
        r.secs
    );
    // Each try reached httpbin (logged when its 2 s are over; one worker per httpbin, so the third
    // waits for the first).
    let n = app_hits(
        &apps(&m),
        "/delay/2?step=per-try",
        3,
        Duration::from_secs(8),
    );
    assert_eq!(n, 3, "attempts: 2: want 3 tries at httpbin, saw {n}");
    let line = access_line(&m.sleep, "/delay/2?step=per-try");
    assert!(
        line.contains("\" 504 ") && flags(&line).iter().any(|f| f == "UT"),
        "want 504 with flag UT in the access log: {line:?}"
    );

    // Without retryOn, Istio's default conditions apply (connect-failure, refused-stream,
    // unavailable, cancelled, retriable-status-codes): none covers a timeout, so the first try's
    // timeout ends the request.
    apply(
        &m,
        "per-try-default.yaml",
        &virtual_service(
            "    timeout: 5s\n    retries:\n      attempts: 2\n      perTryTimeout: 500ms\n",
        ),
    );
    let r = curl(&m, "/delay/2?step=per-try-default");
    assert_eq!(r.code, 504, "{r:?}");
    assert!(
        (0.45..0.95).contains(&r.secs),
        "a per-try timeout is not retried under Istio's default retryOn: want 504 after about \
         0.5 s, took {:.3} s",
        r.secs
    );
    // A wrong retry would show as a second request at the other httpbin: wait long enough for it.
    let n = app_hits(
        &apps(&m),
        "/delay/2?step=per-try-default",
        2,
        Duration::from_secs(4),
    );
    assert_eq!(
        n, 1,
        "want 1 try at httpbin under the default retryOn, saw {n}"
    );
}

/// An app that answers 503 to every POST after reading its whole body (Content-Length or
/// chunked), and logs on stdout each body's length and whether it is one byte repeated, as the
/// test's bodies are: what a retry replayed, seen by a real server.
const UNAVAILABLE_APP: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def read_body(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))
    def do_POST(self):
        data = self.read_body()
        same = len(data) > 0 and data == data[:1] * len(data)
        sys.stdout.write("access POST %s len=%d same=%s\n" % (self.path, len(data), same))
        sys.stdout.flush()
        body = b"unavailable\n"
        self.send_response(503)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, fmt, *args):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print("listening on 127.0.0.1:%d" % s.server_address[1], flush=True)
s.serve_forever()
"#;

/// Starts `script` (prints `listening on ADDR`, then its own lines) with the venv's Python.
fn python_app(m: &Seed, name: &str, script: &str) -> (Proc, std::net::SocketAddr) {
    let mut cmd = Command::new(weft_tests::venv().join("bin/python"));
    cmd.args(["-u", "-c", script]);
    Proc::spawn_listening(name, cmd, m.dir.path()).unwrap()
}

#[test]
fn retries_replay_a_buffered_body_and_not_one_over_the_buffer() {
    let m = seed();
    // Service `unavailable`, one pod: every try reaches the same app, which logs each body.
    m.apply_yaml(
        "unavailable-svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: unavailable\nspec:\n  ports:\n  - name: http\n    port: 8000\n    targetPort: 80\n  selector:\n    app: unavailable\n",
    )
    .unwrap();
    let (app, addr) = python_app(&m, "unavailable-app", UNAVAILABLE_APP);
    let _sidecar = Sidecar::explicit(
        &m.plane,
        "unavailable",
        "unavailable",
        "app=unavailable",
        Some(addr.port()),
        &[],
    )
    .unwrap();
    m.wait_endpoints("outbound|8000||unavailable.default.svc.cluster.local", 1)
        .unwrap();
    apply(
        &m,
        "retry-body.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: unavailable\nspec:\n  hosts:\n  - unavailable\n  http:\n  - route:\n    - destination:\n        host: unavailable\n    retries:\n      attempts: 3\n      retryOn: 5xx\n",
    );
    // What the app logged for `step` once the count has stopped moving (bounded).
    let tries = |step: &str, want: usize| -> Vec<String> {
        let needle = format!("access POST /post?step={step} ");
        let seen = || -> Vec<String> {
            app.stdout_lines()
                .into_iter()
                .filter(|l| l.starts_with(&needle))
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen().len() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(400));
        seen()
    };
    let post = |step: &str, file: &std::path::Path| {
        let data = format!("@{}", file.display());
        // `Expect:` off, so that the answer read is the final one.
        curl_with(
            &m.sleep.outbound,
            &format!("http://unavailable:8000/post?step={step}"),
            &["-H", "Expect:", "--data-binary", &data],
        )
    };

    // A body within the replay buffer is sent whole with each try.
    let small = m.dir.path().join("small.bin");
    std::fs::write(&small, vec![b's'; 16 * 1024]).unwrap();
    let r = post("small", &small);
    assert_eq!(
        r.code, 503,
        "the last try's answer reaches the caller: {r:?}"
    );
    let lines = tries("small", 4);
    assert_eq!(
        lines.len(),
        4,
        "a 16 KiB body under attempts: 3: want 4 tries at the app, saw {lines:#?}"
    );
    assert!(
        lines.iter().all(|l| l.ends_with(" len=16384 same=True")),
        "every try carries the whole body: {lines:#?}"
    );

    // One over the buffer (1 MiB, Envoy's default buffer limit) cannot be replayed: one try, and
    // its answer reaches the caller.
    let big = m.dir.path().join("big.bin");
    std::fs::write(&big, vec![b'b'; 2 * 1024 * 1024]).unwrap();
    let r = post("big", &big);
    assert_eq!(r.code, 503, "a 2 MiB body's one try answers 503: {r:?}");
    let lines = tries("big", 2);
    assert_eq!(
        lines,
        vec!["access POST /post?step=big len=2097152 same=True".to_owned()],
        "a 2 MiB body is sent once, whole, and not retried past the buffer"
    );
}

#[test]
fn route_timeout_answers_504_in_time_with_flag_ut() {
    let m = seed();
    apply(&m, "timeout.yaml", &virtual_service("    timeout: 1s\n"));
    let r = curl(&m, "/delay/3?step=timeout");
    assert_eq!(r.code, 504, "a 3 s answer under a 1 s route timeout: {r:?}");
    assert!(
        (0.95..2.0).contains(&r.secs),
        "want the 504 after about 1 s, took {:.3} s",
        r.secs
    );
    let line = access_line(&m.sleep, "/delay/3?step=timeout");
    assert!(
        line.contains("\" 504 ") && flags(&line).iter().any(|f| f == "UT"),
        "want 504 with flag UT in the access log: {line:?}"
    );
    // The default retry policy does not retry a timeout: httpbin saw one request.
    let n = app_hits(
        &apps(&m),
        "/delay/3?step=timeout",
        1,
        Duration::from_secs(5),
    );
    assert_eq!(
        n, 1,
        "a timed-out request is not retried by default, saw {n}"
    );
}

/// Sends `n` requests for `path` (a unique tag appended) from `threads` threads at once; returns
/// the replies.
fn burst(m: &Seed, path: &str, n: usize, threads: usize) -> Vec<Reply> {
    let outbound = m.sleep.outbound.clone();
    let path = path.to_owned();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (outbound, path) = (outbound.clone(), path.clone());
            std::thread::spawn(move || {
                (0..n)
                    .filter(|i| i % threads == t)
                    .map(|i| curl_via(&outbound, &format!("{path}&i={i}")))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// How many requests whose path starts with `prefix` the apps logged, once the count has stopped
/// moving (bounded).
fn app_hits_prefix(m: &Seed, prefix: &str) -> usize {
    let needle = format!("\"GET {prefix}");
    let count = || -> usize {
        apps(m)
            .iter()
            .map(|a| a.log_lines().iter().filter(|l| l.contains(&needle)).count())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = usize::MAX;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = count();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

const DELAY: &str = "    fault:\n      delay:\n        fixedDelay: 300ms\n        percentage:\n          value: PCT\n";
const ABORT: &str = "    fault:\n      abort:\n        httpStatus: 418\n        percentage:\n          value: PCT\n";

/// A request that took this long was delayed by the fault (a 300 ms sleep never ends early);
/// a plain request on loopback takes a few tens of milliseconds.
const DELAYED: f64 = 0.3;

#[test]
fn fault_delay_and_abort_at_0_50_and_100_percent() {
    let m = seed();

    // Delay at 100%: every request takes the 300 ms, and still succeeds.
    apply(
        &m,
        "delay-100.yaml",
        &virtual_service(&DELAY.replace("PCT", "100")),
    );
    for i in 0..5 {
        let r = curl(&m, &format!("/get?step=delay-100&i={i}"));
        assert_eq!(r.code, 200, "{r:?}");
        assert!(
            r.secs >= DELAYED,
            "delay at 100%: request {i} took {:.3} s, under the 300 ms delay",
            r.secs
        );
    }
    // Delay at 0%: none is delayed. A plain request over 300 ms is machine load, not a fault, so
    // two of twenty may be slow; a delay that fired would slow all of them.
    apply(
        &m,
        "delay-0.yaml",
        &virtual_service(&DELAY.replace("PCT", "0")),
    );
    let slow: Vec<f64> = (0..20)
        .map(|i| curl(&m, &format!("/get?step=delay-0&i={i}")))
        .inspect(|r| assert_eq!(r.code, 200, "{r:?}"))
        .map(|r| r.secs)
        .filter(|s| *s >= DELAYED)
        .collect();
    assert!(
        slow.len() <= 2,
        "delay at 0%: {} of 20 requests took over 300 ms: {slow:?}",
        slow.len()
    );
    // Delay at 50% over 60 requests (4 at a time, to keep the test short): binomial(60, 0.5) falls
    // outside 12..=48 with probability 7.6e-7.
    apply(
        &m,
        "delay-50.yaml",
        &virtual_service(&DELAY.replace("PCT", "50")),
    );
    let replies = burst(&m, "/get?step=delay-50", 60, 4);
    assert!(replies.iter().all(|r| r.code == 200), "{replies:?}");
    let delayed = replies.iter().filter(|r| r.secs >= DELAYED).count();
    assert!(
        (12..=48).contains(&delayed),
        "delay at 50%: {delayed} of 60 requests delayed (expected about 30)"
    );
    // Delayed or not, every request reached httpbin.
    assert_eq!(app_hits_prefix(&m, "/get?step=delay-50&"), 60);

    // Abort at 100%: every request answered 418 by the client sidecar, none reaches httpbin.
    apply(
        &m,
        "abort-100.yaml",
        &virtual_service(&ABORT.replace("PCT", "100")),
    );
    for i in 0..10 {
        let r = curl(&m, &format!("/get?step=abort-100&i={i}"));
        assert_eq!(r.code, 418, "abort at 100%: request {i}: {r:?}");
    }
    assert_eq!(
        app_hits_prefix(&m, "/get?step=abort-100&"),
        0,
        "an aborted request must not reach the app"
    );
    // Abort at 0%: none aborted, all reach httpbin.
    apply(
        &m,
        "abort-0.yaml",
        &virtual_service(&ABORT.replace("PCT", "0")),
    );
    for i in 0..10 {
        let r = curl(&m, &format!("/get?step=abort-0&i={i}"));
        assert_eq!(r.code, 200, "abort at 0%: request {i}: {r:?}");
    }
    assert_eq!(app_hits_prefix(&m, "/get?step=abort-0&"), 10);
    // Abort at 50% over 60: same bounds as the delay (probability 7.6e-7 of a false failure); the
    // ones not aborted, and only those, reach httpbin.
    apply(
        &m,
        "abort-50.yaml",
        &virtual_service(&ABORT.replace("PCT", "50")),
    );
    let replies = burst(&m, "/get?step=abort-50", 60, 4);
    let aborted = replies.iter().filter(|r| r.code == 418).count();
    assert!(
        replies.iter().all(|r| r.code == 418 || r.code == 200),
        "{replies:?}"
    );
    assert!(
        (12..=48).contains(&aborted),
        "abort at 50%: {aborted} of 60 requests aborted (expected about 30)"
    );
    assert_eq!(app_hits_prefix(&m, "/get?step=abort-50&"), 60 - aborted);
}

/// The flags issue 18 adds: `response_flags` on `istio_requests_total` (always `-` before it), and
/// the fault flags in the access log (an abort was answered without an access-log line, a delay
/// left no flag). Kept apart from the behaviour tests above so that what fails says which it is.
#[test]
fn response_flags_reach_istio_requests_total_and_the_access_log() {
    let m = seed();
    apply(
        &m,
        "abort.yaml",
        &virtual_service(&ABORT.replace("PCT", "100")),
    );
    expect(&m, "/get?step=flag-fi", 418);
    apply(
        &m,
        "delay.yaml",
        &virtual_service(&DELAY.replace("PCT", "100")),
    );
    expect(&m, "/get?step=flag-di", 200);
    apply(&m, "timeout.yaml", &virtual_service("    timeout: 1s\n"));
    expect(&m, "/delay/3?step=flag-ut", 504);

    let mut failures = Vec::new();
    let stats = m.sleep.stats().unwrap();
    for (code, flag) in [("418", "FI"), ("200", "DI"), ("504", "UT")] {
        let n = requests_total(
            &stats,
            &[
                "reporter=\"source\"",
                &format!("response_code=\"{code}\""),
                &format!("response_flags=\"{flag}\""),
            ],
        );
        if n != 1 {
            failures.push(format!(
                "istio_requests_total{{response_code=\"{code}\",response_flags=\"{flag}\"}} is {n}, want 1"
            ));
        }
    }
    for (path, code, flag) in [
        ("/get?step=flag-fi", "418", "FI"),
        ("/get?step=flag-di", "200", "DI"),
        ("/delay/3?step=flag-ut", "504", "UT"),
    ] {
        let needle = format!("\"GET {path} HTTP/1.1\"");
        let lines = m.sleep.proc.stdout_lines();
        match lines.iter().find(|l| l.contains(&needle)) {
            Some(l) if l.contains(&format!("\" {code} ")) && flags(l).iter().any(|f| f == flag) => {
            }
            Some(l) => failures.push(format!("want {code} with flag {flag}: {l}")),
            None => failures.push(format!(
                "no access-log line for GET {path} (want {code} {flag})"
            )),
        }
    }
    let istio_lines: Vec<&str> = stats
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    assert!(
        failures.is_empty(),
        "{}\nistio_requests_total:\n{}",
        failures.join("\n"),
        istio_lines.join("\n")
    );
}

/// An app that answers 500 to everything (httpbin cannot be told to per endpoint), logging each
/// request on stdout: a real HTTP/1.1 server from Python's standard library, run with the venv's
/// Python.
const FAILING_APP: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"always failing\n"
        self.send_response(500)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, fmt, *args):
        sys.stdout.write("access " + (fmt % args) + "\n")
        sys.stdout.flush()
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print("listening on 127.0.0.1:%d" % s.server_address[1], flush=True)
s.serve_forever()
"#;

#[test]
fn outlier_detection_ejects_a_failing_endpoint_then_lets_it_back() {
    let m = seed();
    let (bad_app, bad_addr) = python_app(&m, "failing-app", FAILING_APP);
    let _bad = Sidecar::explicit(
        &m.plane,
        "httpbin-bad",
        "httpbin",
        "app=httpbin,version=v3",
        Some(bad_addr.port()),
        &[],
    )
    .unwrap();
    m.wait_endpoints(DEFAULT_CLUSTER, 3).unwrap();
    let bad_hits = || {
        bad_app
            .stdout_lines()
            .iter()
            .filter(|l| l.starts_with("access \"GET /get?step=outlier"))
            .count()
    };

    // No retries, so each failure reaches the caller; eject after 2 consecutive 5xx, for 3 s.
    apply(
        &m,
        "outlier-dr.yaml",
        &destination_rule(
            "    outlierDetection:\n      consecutive5xxErrors: 2\n      interval: 1s\n      baseEjectionTime: 3s\n      maxEjectionPercent: 100\n",
        ),
    );
    apply(
        &m,
        "no-retries.yaml",
        &virtual_service("    retries:\n      attempts: 0\n"),
    );

    // Until the failing endpoint has had its two 500s (one endpoint in three: 60 requests are
    // plenty).
    let mut sent = 0;
    let mut failed = 0;
    while bad_hits() < 2 && sent < 60 {
        let r = curl(&m, &format!("/get?step=outlier&i={sent}"));
        sent += 1;
        match r.code {
            200 => {}
            500 => {
                assert!(
                    r.body.contains("always failing"),
                    "a 500 not from the failing app: {r:?}"
                );
                failed += 1;
            }
            _ => panic!("before the ejection: {r:?}"),
        }
    }
    let ejected_at = Instant::now();
    assert_eq!(
        bad_hits(),
        2,
        "want exactly 2 requests at the failing endpoint before its ejection ({sent} requests sent)"
    );
    assert_eq!(failed, 2, "its two 500s reach the caller (no retries)");

    // Ejected: everything goes to the two httpbins until the failing endpoint comes back, which is
    // after its 3 s ejection, at the next 1 s review.
    let mut returned_after = None;
    let mut during = 0;
    while ejected_at.elapsed() < Duration::from_secs(8) && during < 500 {
        let r = curl(&m, &format!("/get?step=outlier&i={sent}"));
        sent += 1;
        if r.code == 200 {
            during += 1;
            continue;
        }
        assert_eq!(r.code, 500, "{r:?}");
        returned_after = Some(ejected_at.elapsed());
        break;
    }
    let returned_after = returned_after.unwrap_or_else(|| {
        panic!(
            "the ejected endpoint never got traffic again within 8 s ({during} requests, all to the others)"
        )
    });
    assert!(
        returned_after >= Duration::from_millis(2700),
        "the failing endpoint got a request {returned_after:?} after its second 500: it was not \
         ejected for baseEjectionTime 3s ({during} requests went to the others meanwhile)"
    );
    assert!(
        returned_after <= Duration::from_secs(6),
        "the endpoint came back only {returned_after:?} after its ejection (3 s + 1 s interval)"
    );
    assert!(during >= 10, "only {during} requests while it was ejected");

    // One ejection, seen in the metric and in the log.
    let stats = m.sleep.stats().unwrap();
    let ejections = counter(&stats, EJECTIONS_METRIC);
    assert_eq!(
        ejections,
        1.0,
        "{EJECTIONS_METRIC} should count the one ejection; weft_/outlier lines:\n{}",
        stats
            .lines()
            .filter(|l| l.contains("outlier") || l.contains("eject"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let logged = m.sleep.log_count(EJECTION_LOG);
    assert_eq!(
        logged,
        1,
        "want one {EJECTION_LOG:?} line in the client sidecar's log, saw {logged}:\n{}",
        m.sleep.proc.stderr_tail()
    );
}

#[test]
fn circuit_breaker_overflow_is_503_uo_at_once_and_the_rest_succeed() {
    let m = seed();
    apply(
        &m,
        "pool.yaml",
        &destination_rule(
            "    connectionPool:\n      tcp:\n        maxConnections: 1\n      http:\n        http1MaxPendingRequests: 1\n",
        ),
    );
    let outbound = m.sleep.outbound.clone();
    let start = Arc::new(Barrier::new(20));
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (outbound, start) = (outbound.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                curl_via(&outbound, &format!("/delay/1?step=cb&i={i}"))
            })
        })
        .collect();
    let replies: Vec<Reply> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = replies.iter().filter(|r| r.code == 200).count();
    let overflow: Vec<&Reply> = replies.iter().filter(|r| r.code == 503).collect();
    let summary: Vec<(u16, String, bool)> = replies
        .iter()
        .map(|r| (r.code, format!("{:.3}s", r.secs), r.overloaded()))
        .collect();
    assert_eq!(
        ok + overflow.len(),
        20,
        "every request either succeeds or overflows: {summary:?}"
    );
    // One active and one pending at a time, each holding its place for a second, while all 20
    // arrive within a fraction of one: at least 2 succeed, and most overflow.
    assert!(
        ok >= 2,
        "one active and one pending should succeed, {ok} did: {summary:?}"
    );
    assert!(
        overflow.len() >= 10,
        "maxConnections 1 + http1MaxPendingRequests 1 under 20 concurrent 1 s requests: only {} \
         overflowed: {summary:?}",
        overflow.len()
    );
    for r in &overflow {
        assert!(
            r.overloaded(),
            "an overflow 503 carries x-envoy-overloaded: true: {r:?}"
        );
        assert!(
            r.secs < 0.75,
            "an overflow is answered at once, this one took {:.3} s",
            r.secs
        );
    }
    let uo = m
        .sleep
        .proc
        .stdout_lines()
        .iter()
        .filter(|l| l.contains("\"GET /delay/1?step=cb&") && flags(l).iter().any(|f| f == "UO"))
        .count();
    assert_eq!(
        uo,
        overflow.len(),
        "each overflow has flag UO in the client sidecar's access log"
    );
}

#[test]
fn idle_upstream_connections_are_closed_after_idle_timeout() {
    let m = seed();
    let open = |m: &Seed| {
        let (opened, closed) = inbound_connections(m);
        opened - closed
    };
    assert_eq!(open(&m), 0.0, "no mesh connection before the first request");
    apply(
        &m,
        "idle.yaml",
        &destination_rule("    connectionPool:\n      http:\n        idleTimeout: 1s\n"),
    );
    expect(&m, "/get?step=idle", 200);
    let done = Instant::now();
    assert!(
        open(&m) >= 1.0,
        "the connection to the server sidecar stays open right after the request"
    );
    let mut closed_after = None;
    while done.elapsed() < Duration::from_secs(4) {
        if open(&m) == 0.0 {
            closed_after = Some(done.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed_after = closed_after.unwrap_or_else(|| {
        panic!(
            "idleTimeout 1s: the idle connection to the server sidecar was still open after 4 s \
             (opened, closed at its inbound: {:?})",
            inbound_connections(&m)
        )
    });
    assert!(
        closed_after >= Duration::from_millis(700),
        "closed {closed_after:?} after the request: sooner than the 1 s idle timeout"
    );

    // Without it (Istio's default, 1 h) the connection stays: what closed it was the setting.
    delete(&m, "destinationrule");
    expect(&m, "/get?step=idle-default", 200);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        open(&m) >= 1.0,
        "with the default idle timeout the connection should still be open after 2.5 s: {:?}",
        inbound_connections(&m)
    );
}

const PER_CONNECTION_1: &str =
    "    connectionPool:\n      http:\n        maxRequestsPerConnection: 1\n";

/// Sends `n` requests tagged `step`; returns how many connections the server sidecars accepted
/// during each.
fn opened_per_request(m: &Seed, step: &str, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let (before, _) = inbound_connections(m);
            expect(m, &format!("/get?step={step}&i={i}"), 200);
            inbound_connections(m).0 - before
        })
        .collect()
}

#[test]
fn max_requests_per_connection_1_opens_a_connection_per_request() {
    let m = seed();
    // Set before the first request: every request on a connection of its own.
    apply(&m, "per-conn.yaml", &destination_rule(PER_CONNECTION_1));
    let opened = opened_per_request(&m, "per-conn", 6);
    assert!(
        opened.iter().all(|n| *n >= 1.0),
        "maxRequestsPerConnection 1: want a new connection at the server sidecars for each \
         request, saw these opened per request: {opened:?}"
    );

    // Pooled (Istio's default, no limit): a handful of requests share a connection per endpoint.
    delete(&m, "destinationrule");
    let opened = opened_per_request(&m, "pooled", 6);
    assert!(
        opened.iter().sum::<f64>() <= 2.0,
        "without a limit 6 requests opened {opened:?} connections (want at most one per endpoint)"
    );
}

/// A connection pool changed while its connections are open applies to them too: Envoy drains a
/// cluster's connection pools when the cluster's definition changes ("when a cluster definition is
/// updated, the operation is graceful. However, all existing connection pools will be drained and
/// reconnected", Envoy's dynamic-configuration overview), so no request rides a connection opened
/// under the old settings. (An endpoint change alone, EDS in Envoy, keeps them.)
#[test]
fn a_changed_connection_pool_drains_connections_opened_before() {
    let m = seed();
    // Pooled (Istio's default, no limit): one connection per endpoint.
    let opened = opened_per_request(&m, "pooled", 6);
    assert!(
        opened.iter().sum::<f64>() <= 2.0,
        "without a limit 6 requests opened {opened:?} connections (want at most one per endpoint)"
    );
    apply(&m, "per-conn.yaml", &destination_rule(PER_CONNECTION_1));
    let opened = opened_per_request(&m, "per-conn", 6);
    assert!(
        opened.iter().all(|n| *n >= 1.0),
        "maxRequestsPerConnection 1 set while pooled connections were open: want a new \
         connection for each request, saw these opened per request: {opened:?} (a 0 is a \
         request that rode a connection opened before the change)"
    );
}
