//! Primary latency under mirroring (issue 5's benchmark): the primary's p50/p99 at a fixed request rate
//! with 100% mirroring, and with a dead mirror target, each divided by the same without mirroring,
//! measured in the same run. Goal: ratio ≤ 1.1.
//!
//! Real `ca`, `pilot` and three explicit-mode `sidecar`s on 127.0.0.1 (a client pod and the v1/v2
//! pods of one Service), 1 KiB responses from a small in-process HTTP/1.1 app per pod. Load is
//! open-loop (each request is scheduled at a fixed rate and its latency counted from its scheduled
//! time, so a stall is not hidden by the load tool slowing down); every run is bounded in count and
//! time. Scenarios are interleaved per round. Build first: `cargo build --release --bins`.
//!
//! Usage: `cargo run --release -p weft-bench --bin mirror-latency [-- --rate 1000 --secs 5 --rounds 3]
//! [--compare 1]`. With `--compare 1` each round also runs 100% mirroring with shadow-diff on (the
//! VirtualService's `weft.io/mirror-compare: status,headers,body`; issue 20), divided by the same
//! round's run without mirroring; it needs pilot to translate the annotation.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use weft_tests::{ControlPlane, Sidecar};

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: bench\nspec:\n  selector:\n    app: bench\n  ports:\n  - name: http\n    port: 8000\n    targetPort: 80\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: bench\nspec:\n  host: bench\n  subsets:\n  - name: v1\n    labels:\n      version: v1\n  - name: v2\n    labels:\n      version: v2\n";

fn virtual_service(mirror: bool) -> String {
    virtual_service_with(mirror, false)
}

/// The VirtualService, with shadow-diff's annotation when `compare`.
fn virtual_service_with(mirror: bool, compare: bool) -> String {
    let annotation = if compare {
        "\n  annotations:\n    weft.io/mirror-compare: status,headers,body"
    } else {
        ""
    };
    let mut vs = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: bench{annotation}\nspec:\n  hosts:\n  - bench\n  http:\n  - route:\n    - destination:\n        host: bench\n        subset: v1\n"
    );
    if mirror {
        vs.push_str("    mirror:\n      host: bench\n      subset: v2\n");
    }
    vs
}

struct Args {
    rate: u64,
    secs: u64,
    rounds: usize,
    compare: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        rate: 1000,
        secs: 5,
        rounds: 3,
        compare: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().context("flag without value")?;
        match flag.as_str() {
            "--rate" => a.rate = v.parse()?,
            "--secs" => a.secs = v.parse()?,
            "--rounds" => a.rounds = v.parse()?,
            "--compare" => a.compare = v == "1" || v == "true",
            other => bail!("unknown flag {other}"),
        }
    }
    if a.rate == 0
        || a.rate > 20_000
        || a.secs == 0
        || a.secs > 60
        || a.rounds == 0
        || a.rounds > 10
    {
        bail!("keep --rate 1..20000, --secs 1..60, --rounds 1..10 (bounded load)");
    }
    Ok(a)
}

/// The app: answers every request with 1 KiB.
async fn app() -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let body = Bytes::from(vec![b'x'; 1024]);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(http::Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(port)
}

fn apply(plane: &ControlPlane, name: &str, yaml: &str) -> Result<()> {
    let path = plane.dir.join(name);
    std::fs::write(&path, yaml)?;
    let (ok, out, err) = plane.pilot_cmd(&["apply", "-f", &path.to_string_lossy()])?;
    if !ok {
        bail!("apply {name}: {out}{err}");
    }
    Ok(())
}

/// Waits until the client's sidecar has a config that contains `needle` and not `absent`.
fn wait_config(sidecar: &Sidecar, needle: &str, absent: Option<&str>) -> Result<()> {
    for _ in 0..400 {
        let dump = sidecar.config_dump()?;
        if dump.contains(needle) && absent.is_none_or(|a| !dump.contains(a)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("the client's sidecar never got a config with {needle}")
}

/// Open-loop load: `rate` requests per second for `secs`; latencies from each request's scheduled time.
async fn load(proxy: SocketAddr, rate: u64, secs: u64) -> Result<(Vec<Duration>, usize)> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let total = rate * secs;
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let at = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let req = http::Request::get(format!("http://{proxy}/1k"))
                .header(http::header::HOST, "bench:8000")
                .body(Empty::<Bytes>::new())
                .ok()?;
            let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                .await
                .ok()?
                .ok()?;
            let ok = resp.status().is_success();
            resp.into_body().collect().await.ok()?;
            ok.then(|| at.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(Some(l)) => latencies.push(l),
            _ => failed += 1,
        }
    }
    latencies.sort();
    Ok((latencies, failed))
}

/// One measured run: p50 ms, p99 ms, failed requests.
type Run = (f64, f64, usize);

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    weft_tests::init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    // A long grace keeps a killed pod's endpoint in the config: the "dead mirror target".
    let plane = ControlPlane::start(dir.path(), &["--workload-grace", "1h"])?;
    apply(&plane, "service.yaml", SERVICE)?;
    let v1_port = rt.block_on(app())?;
    let v2_port = rt.block_on(app())?;
    let quiet = ["--access-log", "off"];
    let _v1 = Sidecar::explicit(
        &plane,
        "bench-v1",
        "bench",
        "app=bench,version=v1",
        Some(v1_port),
        &quiet,
    )?;
    let mut v2 = Sidecar::explicit(
        &plane,
        "bench-v2",
        "bench",
        "app=bench,version=v2",
        Some(v2_port),
        &quiet,
    )?;
    let client = Sidecar::explicit(&plane, "load", "load", "app=load", None, &quiet)?;
    let proxy: SocketAddr = client.outbound.parse()?;
    wait_config(&client, "default/bench-v2", None)?;

    let mut results: Vec<(&str, Vec<Run>)> = vec![
        ("no mirror", vec![]),
        ("100% mirror", vec![]),
        ("no mirror (2)", vec![]),
        ("dead mirror target", vec![]),
        ("100% mirror, compare", vec![]),
    ];
    let run = |idx: usize, results: &mut Vec<(&str, Vec<Run>)>| -> Result<()> {
        let (lat, failed) = rt.block_on(load(proxy, args.rate, args.secs))?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        results[idx]
            .1
            .push((ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99)), failed));
        Ok(())
    };
    // Warm-up (connections, pools), not counted.
    apply(&plane, "vs.yaml", &virtual_service(false))?;
    wait_config(&client, "default/bench", None)?;
    rt.block_on(load(proxy, args.rate, 1))?;
    for _ in 0..args.rounds {
        apply(&plane, "vs.yaml", &virtual_service(false))?;
        wait_config(&client, "\"mirrors\": []", None)?;
        run(0, &mut results)?;
        apply(&plane, "vs.yaml", &virtual_service(true))?;
        wait_config(&client, "|v2|bench", None)?;
        wait_config(&client, "\"percent\": 100.0", None)?;
        run(1, &mut results)?;
        if args.compare {
            apply(&plane, "vs.yaml", &virtual_service_with(true, true))?;
            wait_config(&client, "\"compare\": {", None)?;
            run(4, &mut results)?;
        }
    }
    // The mirror target dies (its sidecar is killed; pilot keeps the endpoint: connections refused).
    v2.proc.kill()?;
    for _ in 0..args.rounds {
        apply(&plane, "vs.yaml", &virtual_service(false))?;
        wait_config(&client, "\"mirrors\": []", None)?;
        run(2, &mut results)?;
        apply(&plane, "vs.yaml", &virtual_service(true))?;
        wait_config(&client, "\"percent\": 100.0", None)?;
        run(3, &mut results)?;
    }
    let summary: Vec<(&str, f64, f64, usize)> = results
        .iter()
        .map(|(name, runs)| {
            (
                *name,
                median(runs.iter().map(|r| r.0).collect()),
                median(runs.iter().map(|r| r.1).collect()),
                runs.iter().map(|r| r.2).sum(),
            )
        })
        .collect();
    // The goal's ratio: the median over rounds of each round's p99 ratio (the two scenarios of a round
    // run back to back, so slow drift of this shared machine cancels out within a round).
    let paired = |a: usize, b: usize| {
        median(
            results[b]
                .1
                .iter()
                .zip(&results[a].1)
                .map(|(m, n)| m.1 / n.1.max(f64::EPSILON))
                .collect(),
        )
    };
    let r1 = paired(0, 1);
    let r3 = args.compare.then(|| paired(0, 4));
    let r2 = paired(2, 3);
    let base1 = summary[0].2;
    let base2 = summary[2].2;
    println!(
        "# Primary latency with mirroring ({} rps, {} s x {} rounds, 1 KiB, explicit-mode sidecar pair, medians)",
        args.rate, args.secs, args.rounds
    );
    println!("| scenario | p50 ms | p99 ms | failed | median p99 / median no-mirror p99 |");
    println!("|---|---|---|---|---|");
    for (i, (name, p50, p99, failed)) in summary.iter().enumerate() {
        if i == 4 && !args.compare {
            continue;
        }
        let base = if i < 2 || i == 4 { base1 } else { base2 };
        println!(
            "| {name} | {p50:.2} | {p99:.2} | {failed} | {:.2} |",
            p99 / base
        );
    }
    println!();
    println!(
        "goal: median per-round p99 ratio <= 1.1: 100% mirror {:.2} ({}), dead mirror target {:.2} ({})",
        r1,
        if r1 <= 1.1 { "met" } else { "NOT met" },
        r2,
        if r2 <= 1.1 { "met" } else { "NOT met" }
    );
    if let Some(r3) = r3 {
        println!(
            "goal: median per-round p99 ratio <= 1.1: 100% mirror with compare {:.2} ({})",
            r3,
            if r3 <= 1.1 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
