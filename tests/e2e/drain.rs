//! Graceful drain on SIGTERM and the limits at the sidecar's edges (issue 15, defects 3 and 4), with
//! real sidecars, the real httpbin and raw clients.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use weft_tests::raw_http::exchange_head;
use weft_tests::seed::Seed;
use weft_tests::{Sidecar, run};

/// The admin `/ready` status code (0 when nothing answers).
fn ready_code(s: &Sidecar) -> String {
    let (_, out, _) = run(std::process::Command::new("curl").args([
        "-s",
        "-m",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{}/ready", s.admin),
    ]))
    .unwrap();
    out
}

/// Connections the sidecar's outbound listener is serving now.
fn active_outbound(s: &Sidecar) -> f64 {
    s.stats()
        .unwrap()
        .lines()
        .find(|l| l.starts_with("weft_listener_connections_active{listener=\"outbound\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn sigterm_lets_requests_in_flight_finish_then_exits_0() {
    let mut m = Seed::explicit(&[]).unwrap();
    let outbound = m.sleep.outbound.clone();
    // A request in flight through the client side (httpbin answers after 2 s), on a kept-alive
    // HTTP/1.1 connection.
    let in_flight = {
        let outbound = outbound.clone();
        std::thread::spawn(move || {
            exchange_head(
                &outbound,
                b"GET http://httpbin:8000/delay/2 HTTP/1.1\r\nHost: httpbin:8000\r\n\r\n",
                Duration::from_secs(15),
            )
            .unwrap()
        })
    };
    // An idle connection (no request in progress; a request on it would queue behind the slow one
    // at httpbin's single worker): closed by the drain.
    let mut idle = std::net::TcpStream::connect(&outbound).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Both connections are open at the sidecar (on a loaded machine the thread may take a while),
    // and the slow request has had time to reach httpbin.
    let deadline = Instant::now() + Duration::from_secs(20);
    while active_outbound(&m.sleep) < 2.0 {
        assert!(Instant::now() < deadline, "the connections never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));

    let pid = m.sleep.proc.pid().to_string();
    let term = Instant::now();
    run(std::process::Command::new("kill").args(["-TERM", &pid])).unwrap();
    // At once: not ready, and no new connections.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ready_code(&m.sleep), "503", "still ready while draining");
    assert!(
        std::net::TcpStream::connect(&outbound).is_err(),
        "the outbound listener still accepts while draining"
    );
    // The idle connection is closed by the drain: EOF, no answer.
    let mut rest = Vec::new();
    assert!(
        idle.read_to_end(&mut rest).is_ok(),
        "the idle connection stayed open"
    );
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    // The request in flight completes, told that the connection closes after it.
    let reply = in_flight.join().unwrap();
    assert_eq!(reply.status(), Some(200), "{}", reply.text());
    assert!(
        reply.head_lowercase().contains("connection: close"),
        "{}",
        reply.text()
    );
    // Then the sidecar exits 0, before the drain duration (5 s) is over.
    assert!(
        m.sleep.proc.terminate(Duration::from_secs(10)).unwrap(),
        "exit status not 0"
    );
    assert!(
        term.elapsed() < Duration::from_secs(5),
        "{:?}",
        term.elapsed()
    );
}

#[test]
fn a_draining_server_side_sends_goaway_and_no_request_fails() {
    let mut m = Seed::explicit(&[]).unwrap();
    // Warm: the client side holds HTTP/2 connections to both httpbin sidecars.
    let (v1, v2) = m.send(10, &[]).unwrap();
    assert!(v1 > 0 && v2 > 0, "{v1} {v2}");
    let slow = std::thread::spawn({
        let outbound = m.sleep.outbound.clone();
        move || {
            // Several slow requests: some of them are on v1 when it drains.
            (0..4)
                .map(|_| {
                    let outbound = outbound.clone();
                    std::thread::spawn(move || {
                        exchange_head(
                            &outbound,
                            b"GET http://httpbin:8000/delay/1 HTTP/1.1\r\nHost: httpbin:8000\r\nConnection: close\r\n\r\n",
                            Duration::from_secs(15),
                        )
                        .unwrap()
                        .status()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect::<Vec<_>>()
        }
    });
    let v1_before = m.v1.log_lines().len();
    std::thread::sleep(Duration::from_millis(300));
    let pid = m.sidecars[0].proc.pid().to_string();
    run(std::process::Command::new("kill").args(["-TERM", &pid])).unwrap();
    // Requests keep flowing while v1's sidecar drains and after it is gone: none fails.
    for i in 0..8 {
        let (code, body) = m.sleep.curl("http://httpbin:8000/get", &[]).unwrap();
        assert_eq!(code, 200, "request {i} during the drain: {body}");
    }
    assert_eq!(slow.join().unwrap(), vec![Some(200); 4]);
    assert!(
        m.sidecars[0]
            .proc
            .terminate(Duration::from_secs(10))
            .unwrap()
    );
    // Some slow ones were on v1 when it drained, and finished there.
    let v1_delays = m.v1.log_lines()[v1_before..]
        .iter()
        .filter(|l| l.contains("GET /delay/1 "))
        .count();
    assert!(
        v1_delays > 0,
        "no slow request was on v1; the test proved nothing: {:?}",
        &m.v1.log_lines()[v1_before..]
    );
}

/// Opens `n` connections to `addr` that each send `GET` and then one more byte every 300 ms.
fn drippers(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /").unwrap();
            c
        })
        .collect()
}

/// Drips a byte into every connection every 300 ms for at most `for_at_most`; returns how long
/// until every one of them was closed by the server (None if some stayed open).
fn drip_until_closed(conns: &mut [std::net::TcpStream], for_at_most: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut open = vec![true; conns.len()];
    while start.elapsed() < for_at_most {
        for (c, open) in conns.iter_mut().zip(open.iter_mut()) {
            if *open && c.write_all(b"a").is_err() {
                *open = false;
            }
            c.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 256];
            match c.read(&mut buf) {
                Ok(0) => *open = false,
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => *open = false,
                _ => {}
            }
            c.set_nonblocking(false).unwrap();
        }
        if !open.contains(&true) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    None
}

#[test]
fn slow_heads_are_cut_off_connections_are_capped_and_heads_are_limited() {
    let m = Seed::explicit_with(&[], &["--head-timeout", "1s", "--max-connections", "30"]).unwrap();
    let outbound = m.sleep.outbound.clone();
    let inbound = m.sidecars[0].inbound.clone();
    // 20 connections dripping a byte every 300 ms into each side: all closed soon after the head
    // timeout (1 s; the inbound side sniffs the first line within it, then parses the head within
    // it), none kept open.
    for addr in [&outbound, &inbound] {
        let mut conns = drippers(addr, 20);
        let closed = drip_until_closed(&mut conns, Duration::from_secs(8));
        assert!(
            closed.is_some_and(|t| t < Duration::from_secs(4)),
            "dripping connections to {addr} stayed open: {closed:?}"
        );
    }
    // The cap: 30 connections held open (each mid-head), the 31st is refused at once and counted.
    let held = drippers(&outbound, 30);
    std::thread::sleep(Duration::from_millis(200));
    let mut over = std::net::TcpStream::connect(&outbound).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let t = Instant::now();
    let r = over.read(&mut [0u8; 16]);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    let overflow: f64 = m
        .sleep
        .stats()
        .unwrap()
        .lines()
        .find(|l| l.starts_with("weft_listener_overflow_total{listener=\"outbound\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(overflow >= 1.0, "{overflow}");
    drop(held);
    // One head limit on every path: a 100 KiB header gets 431, outbound and inbound (plaintext).
    let big = format!(
        "GET http://httpbin:8000/get HTTP/1.1\r\nHost: httpbin:8000\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    // Wait until the held connections are gone (the cap counts them until their timeout).
    std::thread::sleep(Duration::from_millis(1500));
    for addr in [&outbound, &inbound] {
        let reply = exchange_head(addr, big.as_bytes(), Duration::from_secs(10)).unwrap();
        assert_eq!(reply.status(), Some(431), "{addr}: {}", reply.text());
    }
    // And ordinary requests still pass.
    assert_eq!(m.sleep.curl("http://httpbin:8000/get", &[]).unwrap().0, 200);
}
