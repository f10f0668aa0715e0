//! HTTP fidelity through the mesh (linkerd's transparency tests, `reliability-security.md` §1.4 and
//! §2.4), in explicit mode: client (curl, or raw bytes over TCP) → sleep's sidecar → mTLS/HTTP/2 →
//! httpbin's sidecar → gunicorn httpbin. What the app sends and receives must be what the client
//! sent and receives: bodies byte for byte and streamed, status codes and app headers untouched,
//! hop-by-hop headers dropped, and ambiguous framing refused before it reaches any app.

use std::process::Command;
use std::time::{Duration, Instant};

use weft_tests::raw_http;
use weft_tests::seed::Seed;

/// Deterministic printable text of `len` bytes (lines of hex digits).
fn text_body(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            if i % 64 == 63 {
                b'\n'
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"0123456789abcdef"[(x & 15) as usize]
            }
        })
        .collect()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:.400}"))
}

/// curl straight to the app (no mesh), writing the body to `out`; returns the status.
fn direct(port: u16, path: &str, out: &std::path::Path) -> u16 {
    let (ok, code, err) = weft_tests::run(
        Command::new("curl")
            .args(["-s", "-m", "30", "-w", "%{http_code}", "-o"])
            .arg(out)
            .arg(format!("http://127.0.0.1:{port}{path}")),
    )
    .unwrap();
    assert!(ok, "{err}");
    code.trim().parse().unwrap()
}

#[test]
fn bodies_stream_and_are_preserved_both_ways() {
    let m = Seed::explicit(&[]).unwrap();
    let dir = m.dir.path();

    // A Content-Length body.
    let (code, body) = m
        .sleep
        .curl(
            "http://httpbin:8000/post",
            &[
                "--data-binary",
                "hello mesh",
                "-H",
                "Content-Type: text/plain",
            ],
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let echo = json(&body);
    assert_eq!(echo["data"], "hello mesh");
    assert_eq!(echo["headers"]["Content-Length"], "10", "{body}");

    // A chunked upload (curl streams the file in chunks).
    let small = dir.join("small.txt");
    let small_body = text_body(100_000, 1);
    std::fs::write(&small, &small_body).unwrap();
    let (code, body) = m
        .sleep
        .curl(
            "http://httpbin:8000/post",
            &[
                "-H",
                "Transfer-Encoding: chunked",
                "-H",
                "Content-Type: text/plain",
                "--data-binary",
                &format!("@{}", small.display()),
            ],
        )
        .unwrap();
    assert_eq!(code, 200, "{body:.400}");
    let echo = json(&body);
    assert!(
        echo["data"].as_str().unwrap_or_default().as_bytes() == small_body.as_slice(),
        "chunked upload of {} bytes came back as {} bytes",
        small_body.len(),
        echo["data"].as_str().unwrap_or_default().len()
    );

    // 5 MiB up, and (httpbin echoes it) 5 MiB down, byte for byte.
    let big = dir.join("big.txt");
    let big_body = text_body(5 << 20, 2);
    std::fs::write(&big, &big_body).unwrap();
    let out = dir.join("big.echo.json");
    let (code, _) = m
        .sleep
        .curl(
            "http://httpbin:8000/anything",
            &[
                "-H",
                "Content-Type: text/plain",
                "--data-binary",
                &format!("@{}", big.display()),
                "-o",
                &out.to_string_lossy(),
            ],
        )
        .unwrap();
    assert_eq!(code, 200);
    let echo = json(&std::fs::read_to_string(&out).unwrap());
    let data = echo["data"].as_str().unwrap_or_default().as_bytes();
    assert_eq!(data.len(), big_body.len(), "5 MiB upload: size");
    assert!(data == big_body.as_slice(), "5 MiB upload: content differs");
    assert_eq!(echo["headers"]["Content-Length"], (5 << 20).to_string());

    // Downloads, compared with the same request made to the app directly (seeded: deterministic).
    for path in [
        "/bytes/102400?seed=7",
        "/stream-bytes/102400?seed=7&chunk_size=4096",
        "/drip?numbytes=10000&duration=1&delay=0",
    ] {
        let via = dir.join("via-mesh.bin");
        let straight = dir.join("direct.bin");
        let (code, _) = m
            .sleep
            .curl(
                &format!("http://httpbin:8000{path}"),
                &["-o", &via.to_string_lossy()],
            )
            .unwrap();
        assert_eq!(code, 200, "{path}");
        assert_eq!(direct(m.v1.port, path, &straight), 200);
        let (a, b) = (
            std::fs::read(&via).unwrap(),
            std::fs::read(&straight).unwrap(),
        );
        assert!(!a.is_empty(), "{path}: empty");
        assert_eq!(a.len(), b.len(), "{path}: size through the mesh");
        assert!(a == b, "{path}: content differs through the mesh");
    }

    // Streaming, not buffering: drip's first byte comes at once, the last after 2 s; a proxy that
    // buffered the response would deliver the first byte only at the end.
    let (code, body) = m
        .sleep
        .curl(
            "http://httpbin:8000/drip?numbytes=5&duration=2&delay=0",
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{time_starttransfer} %{time_total}\n%{http_code}",
            ],
        )
        .unwrap();
    assert_eq!(code, 200);
    // This -w replaces the harness's own (it must end with the code too).
    let times: Vec<f64> = body
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    assert_eq!(times.len(), 2, "{body:?}");
    assert!(
        times[0] < 1.2 && times[1] >= 1.5,
        "first byte after {}s, last after {}s: the response was buffered",
        times[0],
        times[1]
    );
}

#[test]
fn framing_headers_are_neither_invented_nor_lost() {
    let m = Seed::explicit(&[]).unwrap();
    // A request without a body reaches the app without Content-Length or Transfer-Encoding.
    let (code, body) = m.sleep.curl("http://httpbin:8000/headers", &[]).unwrap();
    assert_eq!(code, 200);
    let h = &json(&body)["headers"];
    assert!(
        h.get("Transfer-Encoding").is_none() && h.get("Content-Length").is_none(),
        "a bodyless GET gained framing headers: {body}"
    );
    // `Content-Length: 0` is preserved.
    let (code, body) = m
        .sleep
        .curl(
            "http://httpbin:8000/anything",
            &["-X", "POST", "-H", "Content-Length: 0"],
        )
        .unwrap();
    assert_eq!(code, 200);
    let h = &json(&body)["headers"];
    assert_eq!(h["Content-Length"], "0", "{body}");
    assert!(h.get("Transfer-Encoding").is_none(), "{body}");
}

#[test]
fn head_bodyless_responses_and_status_codes_pass_through() {
    let m = Seed::explicit(&[]).unwrap();

    // HEAD: the GET's Content-Length, no body.
    let (code, head) = m
        .sleep
        .curl("http://httpbin:8000/bytes/1000?seed=1", &["-I"])
        .unwrap();
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 1000"),
        "{head}"
    );

    // On one connection: HEAD, then 204, then 304, then 418. Had any of the first three carried
    // a body, the next response would not start right after its head.
    let req = |method: &str, path: &str, last: bool| {
        format!(
            "{method} http://httpbin:8000{path} HTTP/1.1\r\nHost: httpbin:8000\r\n{}\r\n",
            if last { "Connection: close\r\n" } else { "" }
        )
    };
    let pipelined = [
        req("HEAD", "/bytes/1000?seed=1", false),
        req("GET", "/status/204", false),
        req("GET", "/status/304", false),
        req("GET", "/status/418", true),
    ]
    .concat();
    let reply = raw_http::exchange_to_close(
        &m.sleep.outbound,
        pipelined.as_bytes(),
        Duration::from_secs(20),
    )
    .unwrap();
    let text = reply.text();
    let heads: Vec<&str> = text.splitn(4, "\r\n\r\n").collect();
    assert_eq!(heads.len(), 4, "{text}");
    assert!(heads[0].starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        heads[0]
            .to_ascii_lowercase()
            .contains("content-length: 1000"),
        "{text}"
    );
    assert!(
        heads[1].starts_with("HTTP/1.1 204"),
        "HEAD response followed by a body:\n{text}"
    );
    assert!(
        heads[2].starts_with("HTTP/1.1 304"),
        "204 followed by a body:\n{text}"
    );
    assert!(
        heads[3].starts_with("HTTP/1.1 418"),
        "304 followed by a body:\n{text}"
    );
    assert!(text.contains("teapot"), "418's body: {text}");

    // Status codes and the app's own response headers come through as the app sent them.
    for status in [201, 302, 404, 418, 500, 503] {
        let (code, _) = m
            .sleep
            .curl(&format!("http://httpbin:8000/status/{status}"), &[])
            .unwrap();
        assert_eq!(code, status);
    }
    let (code, body) = m
        .sleep
        .curl(
            "http://httpbin:8000/response-headers?x-a=b&X-Multi=one&X-Multi=two",
            &["-i"],
        )
        .unwrap();
    assert_eq!(code, 200);
    let lower = body.to_ascii_lowercase();
    assert!(lower.contains("\nx-a: b\r\n"), "{body}");
    assert!(
        lower.contains("\nx-multi: one\r\n") && lower.contains("\nx-multi: two\r\n"),
        "{body}"
    );
}

/// The body every smuggling case carries: a second, smuggled request for `/anything/smuggled-<n>`, so a
/// leak would show in the access log.
fn smuggled(n: usize) -> String {
    format!("GET http://httpbin:8000/anything/smuggled-{n} HTTP/1.1\r\nHost: httpbin:8000\r\n\r\n")
}

const POST: &str = "POST http://httpbin:8000/post HTTP/1.1\r\nHost: httpbin:8000\r\n";

/// The smuggling shapes of `reliability-security.md` §2.4 H1, H4, H5 and H6, except both
/// Content-Length and Transfer-Encoding (see [`cl_te_cases`]).
fn smuggling_cases() -> Vec<(&'static str, String)> {
    vec![
        (
            "two different Content-Length",
            format!(
                "{POST}Content-Length: 5\r\nContent-Length: 70\r\n\r\nhello{}",
                smuggled(3)
            ),
        ),
        (
            "Content-Length: +5",
            format!("{POST}Content-Length: +5\r\n\r\nhello{}", smuggled(4)),
        ),
        (
            "NUL in a header value",
            format!(
                "{POST}X-Foo: a\0b\r\nContent-Length: 5\r\n\r\nhello{}",
                smuggled(5)
            ),
        ),
        (
            "two Host headers",
            format!(
                "GET http://httpbin:8000/get HTTP/1.1\r\nHost: httpbin:8000\r\nHost: evil:8000\r\n\r\n{}",
                smuggled(6)
            ),
        ),
        (
            "Transfer-Encoding: xchunked",
            format!(
                "{POST}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{}",
                smuggled(7)
            ),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!(
                "{POST}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{}",
                smuggled(8)
            ),
        ),
    ]
}

/// CL.TE / TE.CL: both framings on one request, in either order (H5).
fn cl_te_cases() -> Vec<(&'static str, String)> {
    vec![
        (
            "Content-Length then Transfer-Encoding",
            format!(
                "{POST}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{}",
                smuggled(1)
            ),
        ),
        (
            "Transfer-Encoding then Content-Length",
            format!(
                "{POST}Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n{}",
                smuggled(2)
            ),
        ),
    ]
}

/// Sends each case raw to sleep's outbound port (absolute form, as an app using the proxy would)
/// and asserts each is answered 400 or has its connection closed, and that none reaches an app.
fn assert_refused_before_the_app(cases: Vec<(&'static str, String)>) {
    let m = Seed::explicit(&[]).unwrap();
    let logs = || m.v1.log_lines().len() + m.v2.log_lines().len();
    let before = logs();
    let mut wrong = Vec::new();
    for (what, bytes) in cases {
        let reply =
            raw_http::exchange_head(&m.sleep.outbound, bytes.as_bytes(), Duration::from_secs(10))
                .unwrap();
        match reply.status() {
            Some(400) => {}
            None if reply.closed => {}
            other => wrong.push(format!(
                "{what}: {other:?} (closed: {}):\n{}",
                reply.closed,
                reply.text()
            )),
        }
    }
    // Then one good request, and wait (bounded) until the app has logged it: a refused request
    // that still leaked would be logged before it (each app is one gunicorn worker, in order).
    let (code, body) = m
        .sleep
        .curl("http://httpbin:8000/get?control=1", &[])
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while logs() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines: Vec<String> =
        m.v1.log_lines()
            .into_iter()
            .chain(m.v2.log_lines())
            .collect();
    let leaked: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("smuggled") || l.contains("/post") || l.contains("evil"))
        .collect();
    assert!(
        wrong.is_empty(),
        "ambiguous requests not refused:\n{}",
        wrong.join("\n")
    );
    assert!(leaked.is_empty(), "reached the app: {leaked:#?}");
    assert_eq!(
        logs() - before,
        1,
        "only the control request reaches the app"
    );
}

#[test]
fn smuggling_shapes_are_refused_and_never_reach_the_app() {
    assert_refused_before_the_app(smuggling_cases());
}

#[test]
fn content_length_with_transfer_encoding_is_refused() {
    assert_refused_before_the_app(cl_te_cases());
}

#[test]
fn hop_by_hop_headers_are_dropped_end_to_end_headers_kept() {
    let m = Seed::explicit(&[]).unwrap();
    // show_env=1: httpbin otherwise hides X-Request-Id (and other proxy-set headers) from /headers.
    let (code, body) = m
        .sleep
        .curl(
            "http://httpbin:8000/headers?show_env=1",
            &[
                "-H",
                "Connection: x-secret",
                "-H",
                "X-Secret: 1",
                "-H",
                "Keep-Alive: timeout=5",
                "-H",
                "X-Request-Id: e2e-4f1d",
                "-H",
                "X-End-To-End: kept",
            ],
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let h = &json(&body)["headers"];
    assert!(h.get("X-Secret").is_none(), "X-Secret forwarded: {body}");
    assert!(
        h.get("Keep-Alive").is_none(),
        "Keep-Alive forwarded: {body}"
    );
    assert!(
        !h["Connection"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase()
            .contains("x-secret"),
        "{body}"
    );
    assert_eq!(h["X-Request-Id"], "e2e-4f1d", "{body}");
    assert_eq!(h["X-End-To-End"], "kept", "{body}");
}

/// An app that accepts `Upgrade: echo` and then echoes raw bytes (the shape of a WebSocket).
async fn upgrade_echo_app() -> u16 {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: http::Request<hyper::body::Incoming>| async move {
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = on.await {
                                let mut io = TokioIo::new(up);
                                let (mut r, mut w) = tokio::io::split(&mut io);
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        let mut resp =
                            http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut()
                            .insert("connection", "upgrade".parse().unwrap());
                        resp.headers_mut()
                            .insert("upgrade", "echo".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    port
}

#[test]
fn http_upgrades_and_connect_tunnels_cross_the_mesh() {
    use std::io::{Read, Write};
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = weft_tests::ControlPlane::start(dir.path(), &[]).unwrap();
    plane
        .apply_yaml(
            "ws.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: ws\nspec:\n  selector:\n    app: ws\n  ports:\n  - name: http\n    port: 8000\n    targetPort: 80\n",
        )
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app_port = rt.block_on(upgrade_echo_app());
    let _ws =
        weft_tests::Sidecar::explicit(&plane, "ws-1", "ws", "app=ws", Some(app_port), &[]).unwrap();
    let client =
        weft_tests::Sidecar::explicit(&plane, "client", "client", "app=client", None, &[]).unwrap();
    let mut ready = false;
    for _ in 0..200 {
        if client.config_dump().unwrap().contains("default/ws-1") {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ready, "the ws endpoint never reached the client's sidecar");

    let mut tcp = std::net::TcpStream::connect(&client.outbound).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET http://ws:8000/chat HTTP/1.1\r\nHost: ws:8000\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).unwrap(),
            1,
            "connection closed in the response head: {head:?}"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    // After the switch, bytes flow both ways through both sidecars.
    for msg in [&b"ping"[..], b"a longer message through the mesh"] {
        tcp.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        tcp.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    }

    // CONNECT (explicit mode): a tunnel to the Service, carried over mTLS to its pod's sidecar.
    let mut tunnel = std::net::TcpStream::connect(&client.outbound).unwrap();
    tunnel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let read_head = |s: &mut std::net::TcpStream| {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "closed in a head: {head:?}");
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).to_ascii_lowercase()
    };
    tunnel
        .write_all(b"CONNECT ws:8000 HTTP/1.1\r\nHost: ws:8000\r\n\r\n")
        .unwrap();
    let head = read_head(&mut tunnel);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Through the tunnel, the app itself answers.
    tunnel
        .write_all(b"GET / HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let head = read_head(&mut tunnel);
    assert!(head.starts_with("http/1.1 101"), "{head}");
    tunnel.write_all(b"tunnelled").unwrap();
    let mut back = [0u8; 9];
    tunnel.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"tunnelled");
}

/// Framing is judged on every request of a connection, not only the first, on the client side
/// (after the first bodied request hands the connection to hyper) and on the server side's
/// plaintext port: CL+TE after a bodied request, a bare-LF head, and a malformed chunk size (400
/// that names the body, not a 502 that blames the upstream).
#[test]
fn framing_is_judged_on_every_request_of_a_connection() {
    let m = Seed::explicit(&[]).unwrap();
    let inbound = m.sidecars[0].inbound.clone();
    let targets = [
        ("outbound", m.sleep.outbound.clone(), "http://httpbin:8000"),
        ("inbound", inbound, ""),
    ];
    for (side, addr, prefix) in targets {
        let host = "Host: httpbin:8000\r\n";
        let first = format!(
            "POST {prefix}/anything/first-{side} HTTP/1.1\r\n{host}Content-Length: 5\r\n\r\nhello"
        );
        let cl_te = format!(
            "POST {prefix}/anything/smuggled-clte-{side} HTTP/1.1\r\n{host}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        );
        let reply = raw_http::exchange_to_close(
            &addr,
            format!("{first}{cl_te}").as_bytes(),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(reply.statuses(), vec![200, 400], "{side}: {}", reply.text());
        assert!(
            reply
                .text()
                .contains("both Content-Length and Transfer-Encoding"),
            "{side}: {}",
            reply.text()
        );

        let lf =
            format!("GET {prefix}/anything/smuggled-lf-{side} HTTP/1.1\nHost: httpbin:8000\n\n");
        let reply = raw_http::exchange_to_close(
            &addr,
            format!("{first}{lf}").as_bytes(),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(reply.statuses(), vec![200, 400], "{side}: {}", reply.text());
        assert!(reply.text().contains("bare LF"), "{side}: {}", reply.text());

        let chunky = format!(
            "POST {prefix}/anything/chunky-{side} HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"
        );
        let reply =
            raw_http::exchange_to_close(&addr, chunky.as_bytes(), Duration::from_secs(10)).unwrap();
        assert_eq!(reply.status(), Some(400), "{side}: {}", reply.text());
        assert!(
            reply
                .head_lowercase()
                .contains("x-weft-error: bad request: malformed chunk size"),
            "{side}: {}",
            reply.text()
        );
    }
    // The apps saw the first requests, and none of the refused ones.
    let lines: Vec<String> =
        m.v1.log_lines()
            .into_iter()
            .chain(m.v2.log_lines())
            .collect();
    assert!(
        lines.iter().any(|l| l.contains("/anything/first-outbound")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("/anything/first-inbound")),
        "{lines:#?}"
    );
    assert!(!lines.iter().any(|l| l.contains("smuggled")), "{lines:#?}");
}
