//! weft's sidecar pair in the shared loopback benchmark (`../shared/bench/run.sh`): the same load,
//! against a direct call and an HAProxy mTLS pair, measured in the same run; the recipe prints medians
//! and the ratios `ours / direct` and `ours / haproxy`.
//!
//! Two real `sidecar`s in explicit mode on 127.0.0.1, one worker thread each (`--concurrency`, as the
//! recipe gives HAProxy `nbthread`), mTLS with certificates from a real `ca`: the client-side one takes the load tool's plain
//! HTTP/1.1 or h2c on its outbound port and forwards over mTLS/HTTP/2 to the server-side one, which
//! forwards to the recipe's nginx backend on 127.0.0.1:18080. Their config comes from an in-process
//! discovery server (the e2e suite's fake pilot), because the load tool addresses the proxy itself
//! (`Host: 127.0.0.1:PORT`), a name no Kubernetes Service can have. Access logs are off, as HAProxy's.
//!
//! `WEFT_BENCH_TRACE_SAMPLING=PCT` turns tracing on: both sidecars export to an OTLP sink and the
//! pushed config samples PCT% of new traces (Istio's default is 1; the demo's 100).
//!
//! Usage (root; installs the recipe's tools with apt): `cargo build --release --bins && cargo run
//! --release -p weft-bench --bin sidecar-pair [-- RECIPE_DIR [REPEATS]]`; RECIPE_DIR defaults to
//! `../shared/bench` next to the repository; env knobs of the recipe (DUR, SCENARIOS...) pass through.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use weft_tests::fake_pilot::{FakePilot, simple_config};
use weft_tests::{ControlPlane, Sidecar};

fn main() -> Result<()> {
    // The recipe gives each HAProxy PROXY_THREADS worker threads (default 1); ours get as many.
    let threads = std::env::var("PROXY_THREADS").unwrap_or_else(|_| "1".into());
    let mut args = std::env::args().skip(1);
    let recipe = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/bench"))
        });
    let repeats = args.next().unwrap_or_else(|| "3".into());
    let run_sh = recipe.join("run.sh");
    if !run_sh.exists() {
        bail!("{} not found: pass the recipe directory", run_sh.display());
    }
    let need = ["haproxy", "nginx", "wrk", "h2load", "hey"];
    if need.iter().any(|t| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .status()
            .is_ok_and(|s| s.success())
    }) {
        println!(
            "installing the recipe's tools: apt-get install haproxy nginx-light wrk hey nghttp2-client"
        );
        let ok = Command::new("sh")
            .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx-light wrk hey nghttp2-client >/dev/null"])
            .status()
            .context("apt-get")?
            .success();
        if !ok {
            bail!("could not install the recipe's tools (needs root and Debian's registry)");
        }
    }

    weft_tests::init();
    let dir = tempfile::tempdir()?;
    let mut plane = ControlPlane::start(dir.path(), &[])?;
    let sampling: Option<f64> = match std::env::var("WEFT_BENCH_TRACE_SAMPLING") {
        Ok(v) => Some(
            v.parse()
                .context("WEFT_BENCH_TRACE_SAMPLING: a percentage")?,
        ),
        Err(_) => None,
    };
    let _sink = match sampling {
        Some(_) => {
            let sink = weft_tests::OtlpSink::start(dir.path(), None)?;
            plane.otlp = Some(sink.grpc.clone());
            Some(sink)
        }
        None => None,
    };
    let pilot = FakePilot::start(&plane)?;
    // A first, empty config lets the sidecars become ready; the real one needs their ports.
    pilot.push("1", simple_config("unused", 1, &[]));
    let flags = ["--access-log", "off", "--concurrency", &threads];
    let server = Sidecar::explicit_with_pilot(
        &plane,
        &pilot.addr.to_string(),
        "server",
        "server",
        "app=server",
        Some(18080),
        &flags,
    )?;
    let client = Sidecar::explicit_with_pilot(
        &plane,
        &pilot.addr.to_string(),
        "client",
        "client",
        "app=client",
        None,
        &flags,
    )?;
    let out_port: u16 = client
        .outbound
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .context("client port")?;
    let in_port: u16 = server
        .inbound
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .context("server port")?;
    // The load tool's Host is 127.0.0.1:<client port>: make that the Service's name and port.
    let mut config = simple_config(
        "127.0.0.1",
        out_port,
        &[(
            "127.0.0.1",
            in_port,
            "spiffe://cluster.local/ns/default/sa/server",
        )],
    );
    if let Some(pct) = sampling {
        config.tracing = Some(weft_proto::discovery::Tracing {
            sampling_percent: pct,
            service_name: "client.default".into(),
        });
    }
    let nonce = pilot.push("2", config);
    let reply = pilot.reply_to(&nonce, Duration::from_secs(20))?;
    if reply.is_nack() {
        bail!(
            "the client sidecar rejected the benchmark config: {}",
            reply.error()
        );
    }
    let url = format!("http://127.0.0.1:{out_port}");
    let pids = format!("{} {}", client.proc.pid(), server.proc.pid());
    println!(
        "weft pair: {url} (pids {pids}); running {}",
        run_sh.display()
    );
    let status = Command::new("bash")
        .arg(&run_sh)
        .arg(&repeats)
        .env("OURS_URL", &url)
        .env("OURS_H2_URL", &url)
        .env("OURS_PIDS", &pids)
        .status()
        .context("run.sh")?;
    if !status.success() {
        bail!("run.sh failed: {status}");
    }
    Ok(())
}
