//! Config push latency and memory of one pilot with many sidecar streams (issue 3, "Benchmark").
//!
//! Runs a real `ca serve` and `pilot serve` as processes on 127.0.0.1 (through `weft-tests`'
//! `ControlPlane`), applies `--services` Kubernetes Services plus a DestinationRule and a
//! VirtualService for one of them with `pilot apply -f`, and opens `--streams` simulated sidecars:
//! real discovery streams over mTLS (one certificate per namespace, shared by that namespace's pods),
//! each pod the endpoint of one Service, each ACKing every push as soon as it arrives. Then, for a
//! bounded number of rounds, it changes the VirtualService and measures per stream the time from the
//! `pilot apply` command's return to (a) receiving the push that carries the change and (b) sending
//! its ACK. pilot's 100 ms debounce is part of that time, as it is for a real sidecar.
//!
//! Baseline measured in the same run: the same change pushed to one stream (before the others
//! connect), and pilot's RSS with the Services applied and no streams. The report gives each figure
//! and its ratio to the baseline. The simulated sidecars share the machine's cores with pilot; they
//! decode only the version, the nonce and a marker (not the whole config) to keep their share small.
//!
//! Usage (the bench starts the binaries next to its own executable, so build them first):
//! ```sh
//! cargo build --release --bins
//! cargo run --release -p weft-bench --bin pilot-push [-- --streams 1000 --services 1000 --rounds 3 --pods true|false]
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use weft_ca::SpiffeId;
use weft_ca::tls::{self, CredentialStore};
use weft_proto::discovery as pb;
use weft_tests::ControlPlane;

/// Namespaces the Services and pods are spread over (one client certificate each).
const NAMESPACES: usize = 4;
/// Service account of every simulated pod.
const SERVICE_ACCOUNT: &str = "bench";
/// Marker in the VirtualService's route name; the 4 digits after it are the round.
const MARKER: &[u8] = b"weft-bench-round-";
/// Upper bounds on what the command line may ask for (every loop here is bounded).
const MAX_STREAMS: usize = 5000;
const MAX_SERVICES: usize = 10_000;
const MAX_ROUNDS: u32 = 20;
/// How long the streams may take to connect and settle, and one round may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);
/// Settled = every stream has its first push and no push arrived for this long.
const QUIET: Duration = Duration::from_secs(2);
/// TLS handshakes in flight while the streams connect.
const CONNECT_CONCURRENCY: usize = 32;
/// Connection attempts per stream (500 ms × attempt backoff between them).
const CONNECT_ATTEMPTS: u64 = 20;
/// Pods registered per `pilot apply`.
const POD_BATCH: usize = 50;
/// pilot's debounce quiet period (its default), part of every measured latency.
const DEBOUNCE: &str = "100 ms";

#[derive(Debug, Clone, Copy)]
struct Args {
    streams: usize,
    services: usize,
    rounds: u32,
    /// `--pods false`: no Pod records; pilot runs with `--trust-workload-claims` and admits the
    /// streams as they declare themselves (how pilot worked before Pod records, issue 16), to
    /// compare code with code on the same objects.
    pods: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        streams: 1000,
        services: 1000,
        rounds: 3,
        pods: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--streams" => args.streams = value.parse().context("--streams")?,
            "--services" => args.services = value.parse().context("--services")?,
            "--rounds" => args.rounds = value.parse().context("--rounds")?,
            "--pods" => args.pods = value.parse().context("--pods true|false")?,
            _ => bail!(
                "unknown argument {flag}; usage: pilot-push [--streams N] [--services N] [--rounds N] [--pods true|false]"
            ),
        }
    }
    ensure!(
        (1..=MAX_STREAMS).contains(&args.streams),
        "--streams must be 1..={MAX_STREAMS}"
    );
    ensure!(
        (1..=MAX_SERVICES).contains(&args.services),
        "--services must be 1..={MAX_SERVICES}"
    );
    ensure!(
        (1..=MAX_ROUNDS).contains(&args.rounds),
        "--rounds must be 1..={MAX_ROUNDS}"
    );
    Ok(args)
}

fn main() -> Result<()> {
    // `weft_tests::bin` finds the binaries through WEFT_BIN_DIR or a test binary's location
    // (target/<profile>/deps/..); a bench lives in target/<profile>, so pass its own directory on.
    if std::env::var_os("WEFT_BIN_DIR").is_none() {
        let exe = std::env::current_exe().context("current_exe")?;
        let dir = exe.parent().context("executable has no directory")?;
        let status = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env("WEFT_BIN_DIR", dir)
            .status()
            .context("re-run with WEFT_BIN_DIR")?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let args = parse_args()?;
    for name in ["ca", "pilot"] {
        let path = weft_bin_dir().join(name);
        ensure!(
            path.exists(),
            "{} not found: run `cargo build --release --bins` (same profile as the bench) first",
            path.display()
        );
    }
    weft_tests::init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

fn weft_bin_dir() -> PathBuf {
    std::env::var_os("WEFT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_default()
}

// === pilot's memory ===

/// `VmRSS` and `VmHWM` (peak) of a process, in bytes.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("{name} missing from /proc/{pid}/status"))?;
        let kb: u64 = line
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad {name} line {line:?}"))?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// === config ===

fn namespace(i: usize) -> String {
    format!("bench-{}", i % NAMESPACES)
}

fn service_name(i: usize) -> String {
    format!("svc-{i:04}")
}

/// `services` Services, Service i in namespace i % 4 selecting `app: svc-i`, and a DestinationRule
/// with subsets v1/v2 plus the round-0 VirtualService for Service 0.
fn initial_config(services: usize) -> String {
    let mut yaml = String::new();
    for i in 0..services {
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
             spec:\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n  \
             selector:\n    app: {name}\n---\n",
            name = service_name(i),
            ns = namespace(i),
        );
    }
    let _ = write!(
        yaml,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {name}\n  \
         namespace: {ns}\nspec:\n  host: {name}\n  subsets:\n  - name: v1\n    labels:\n      \
         version: v1\n  - name: v2\n    labels:\n      version: v2\n---\n",
        name = service_name(0),
        ns = namespace(0),
    );
    yaml.push_str(&virtual_service(0));
    yaml
}

/// The Pods of the simulated sidecars `pods` (pilot admits a stream only as a registered Pod).
fn pods_config(pods: std::ops::Range<usize>) -> String {
    pods.map(|i| {
        let n = node(i);
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        weft_tests::pod_yaml(
            &n.namespace,
            &n.name,
            &n.service_account,
            &labels.join(","),
            &n.ip,
        ) + "---\n"
    })
    .collect()
}

/// The VirtualService for Service 0 in round `round`: a weighted split whose route name carries the
/// round, so a stream can tell which change a push reflects.
fn virtual_service(round: u32) -> String {
    let v2 = round % 50 + 1;
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\n  \
         namespace: {ns}\nspec:\n  hosts:\n  - {name}\n  http:\n  - name: {marker}{round:04}\n    \
         route:\n    - destination:\n        host: {name}\n        subset: v1\n      weight: {v1}\n    \
         - destination:\n        host: {name}\n        subset: v2\n      weight: {v2}\n",
        name = service_name(0),
        ns = namespace(0),
        marker = String::from_utf8_lossy(MARKER),
        v1 = 100 - v2,
    )
}

fn apply(plane: &ControlPlane, dir: &Path, name: &str, yaml: &str) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, yaml)?;
    let path = path.to_string_lossy().into_owned();
    let (ok, _out, err) = plane.pilot_cmd(&["apply", "-f", &path])?;
    ensure!(ok, "pilot apply -f {path} failed: {err}");
    Ok(())
}

// === simulated sidecars ===

/// What a simulated sidecar decodes of a push: the version, the nonce and the config as raw bytes
/// (field numbers as `discovery.proto`'s `DiscoveryResponse`).
#[derive(Clone, PartialEq, prost::Message)]
struct LiteResponse {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(string, tag = "2")]
    nonce: String,
    #[prost(bytes = "bytes", tag = "3")]
    config: bytes::Bytes,
}

/// One push as a stream saw it.
#[derive(Debug)]
struct Push {
    stream: usize,
    /// The round whose VirtualService the config carries.
    round: Option<u32>,
    received: Instant,
    acked: Instant,
}

/// The round number after the marker in an encoded config, if present.
fn round_of(config: &[u8]) -> Option<u32> {
    let at = config.windows(MARKER.len()).position(|w| w == MARKER)?;
    let digits = config.get(at + MARKER.len()..at + MARKER.len() + 4)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// One mTLS client config per namespace (identity `ns/<ns>/sa/bench`), from the real CA.
async fn client_configs(plane: &ControlPlane) -> Result<Vec<Arc<rustls::ClientConfig>>> {
    let bundle = plane.bundle()?;
    let pilot_id = SpiffeId::new("cluster.local", "weft-system", "pilot")?;
    let mut configs = Vec::with_capacity(NAMESPACES);
    for n in 0..NAMESPACES {
        let ns = namespace(n);
        let creds = plane
            .credentials(&ns, SERVICE_ACCOUNT, Duration::from_secs(3600))
            .await?;
        let cfg = tls::client_config(
            Some(CredentialStore::new(creds)),
            &bundle,
            vec![pilot_id.clone()],
            &[tls::ALPN_H2],
        )?;
        configs.push(Arc::new(cfg));
    }
    Ok(configs)
}

/// Pod i: namespace i % 4, labels `app: svc-i` (so Service i selects it) and `version: v1|v2`.
fn node(i: usize) -> pb::Node {
    pb::Node {
        name: format!("pod-{i:04}"),
        namespace: namespace(i),
        service_account: SERVICE_ACCOUNT.into(),
        labels: [
            ("app".to_string(), service_name(i)),
            (
                "version".to_string(),
                if (i / NAMESPACES).is_multiple_of(2) {
                    "v1"
                } else {
                    "v2"
                }
                .to_string(),
            ),
        ]
        .into_iter()
        .collect(),
        ip: format!("10.1.{}.{}", i / 250, i % 250 + 1),
        ports: vec![8080],
        inbound_port: 15006,
        captured: true,
        proxy_version: env!("CARGO_PKG_VERSION").into(),
    }
}

type Opened = (
    mpsc::Sender<pb::DiscoveryRequest>,
    tonic::Streaming<LiteResponse>,
);

/// Opens the discovery stream of pod `i` and sends its node.
async fn open(
    i: usize,
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    connect: &Semaphore,
) -> Result<Opened, String> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::DiscoveryRequest {
        node: Some(node(i)),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let _permit = connect.acquire().await.map_err(|e| e.to_string())?;
    let channel = weft_ca::grpc::tls_channel(addr, tls.clone(), &Default::default())
        .map_err(|e| e.to_string())?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| e.to_string())?;
    let codec = tonic_prost::ProstCodec::<pb::DiscoveryRequest, LiteResponse>::default();
    let path =
        http::uri::PathAndQuery::from_static("/weft.discovery.v1.DiscoveryService/StreamConfig");
    let inbound = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    Ok((tx, inbound))
}

/// What the streams report, in arrival order.
type Events = mpsc::UnboundedReceiver<Result<Event, String>>;

/// What a stream reports.
#[derive(Debug)]
enum Event {
    Push(Push),
    /// A connection attempt failed and will be retried.
    Retry,
}

/// Connects stream `i` and ACKs every push until the stream or `events` ends.
async fn sidecar(
    i: usize,
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    connect: Arc<Semaphore>,
    events: mpsc::UnboundedSender<Result<Event, String>>,
) {
    let result = async {
        // Like a real sidecar, retry (bounded, with backoff) while pilot is too busy to connect.
        let mut attempt = 0;
        let (tx, mut inbound) = loop {
            attempt += 1;
            match open(i, &addr, &tls, &connect).await {
                Ok(open) => break open,
                Err(e) if attempt >= CONNECT_ATTEMPTS => {
                    return Err(format!("{e} (after {attempt} attempts)"));
                }
                Err(_) => {
                    let _ = events.send(Ok(Event::Retry));
                    tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                }
            }
        };
        loop {
            let Some(push) = inbound.message().await.map_err(|e| e.to_string())? else {
                return Ok::<(), String>(());
            };
            let received = Instant::now();
            let round = round_of(&push.config);
            tx.send(pb::DiscoveryRequest {
                version_info: push.version_info,
                response_nonce: push.nonce,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
            let acked = Instant::now();
            let event = Push {
                stream: i,
                round,
                received,
                acked,
            };
            if events.send(Ok(Event::Push(event))).is_err() {
                return Ok(());
            }
        }
    }
    .await;
    let _ = events.send(Err(match result {
        Ok(()) => format!("stream {i} ended"),
        Err(e) => format!("stream {i}: {e}"),
    }));
}

/// Receives pushes until every stream has at least one and none arrived for [`QUIET`].
async fn settle(events: &mut Events, streams: usize) -> Result<(u64, u64)> {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    let mut seen = vec![false; streams];
    let mut count = 0usize;
    let mut pushes = 0u64;
    let mut retries = 0u64;
    loop {
        let wait = if count == streams {
            QUIET
        } else {
            Duration::from_secs(30)
        };
        match tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + wait),
            events.recv(),
        )
        .await
        {
            Ok(Some(Ok(Event::Retry))) => retries += 1,
            Ok(Some(Ok(Event::Push(push)))) => {
                pushes += 1;
                if let Some(s) = seen.get_mut(push.stream)
                    && !*s
                {
                    *s = true;
                    count += 1;
                }
            }
            Ok(Some(Err(e))) => bail!("{e}"),
            Ok(None) => bail!("all streams ended"),
            Err(_) if count == streams => return Ok((pushes, retries)),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                bail!("only {count} of {streams} streams got a config within {SETTLE_TIMEOUT:?}")
            }
            Err(_) => {
                eprintln!(
                    "  ... {count} of {streams} streams have their first config ({retries} connection retries)"
                );
            }
        }
    }
}

/// Latencies of one round, per stream: (received, acked) after `start`.
async fn round(
    plane: &ControlPlane,
    dir: &Path,
    events: &mut Events,
    streams: usize,
    round: u32,
) -> Result<Vec<(Duration, Duration)>> {
    apply(
        plane,
        dir,
        &format!("round-{round}.yaml"),
        &virtual_service(round),
    )?;
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + ROUND_TIMEOUT;
    let mut got: Vec<Option<(Duration, Duration)>> = vec![None; streams];
    let mut missing = streams;
    while missing > 0 {
        let Ok(event) = tokio::time::timeout_at(deadline, events.recv()).await else {
            bail!(
                "round {round}: {missing} of {streams} streams did not get the change within {ROUND_TIMEOUT:?}"
            );
        };
        let push = match event {
            Some(Ok(Event::Push(push))) => push,
            Some(Ok(Event::Retry)) => continue,
            Some(Err(e)) => bail!("{e}"),
            None => bail!("all streams ended"),
        };
        if push.round != Some(round) {
            continue;
        }
        if let Some(slot) = got.get_mut(push.stream)
            && slot.is_none()
        {
            *slot = Some((
                push.received.saturating_duration_since(start),
                push.acked.saturating_duration_since(start),
            ));
            missing -= 1;
        }
    }
    // Let stragglers (pushes of other changes) drain before the next round, for at most as long
    // as a round may take.
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout_at(deadline, tokio::time::timeout(QUIET, events.recv())).await
    {
        if let Err(e) = event {
            bail!("{e}");
        }
    }
    Ok(got.into_iter().flatten().collect())
}

/// Opens streams for pods `0..n` (connecting at most [`CONNECT_CONCURRENCY`] at a time).
fn connect(
    plane: &ControlPlane,
    tls: &[Arc<rustls::ClientConfig>],
    n: usize,
) -> Result<(Events, Vec<tokio::task::JoinHandle<()>>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let limit = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = tls.get(i % NAMESPACES).context("no client config")?.clone();
        tasks.push(tokio::spawn(sidecar(
            i,
            plane.discovery_addr.clone(),
            cfg,
            limit.clone(),
            tx.clone(),
        )));
    }
    Ok((rx, tasks))
}

/// Percentile (nearest rank) of sorted durations.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len() - 1))
        .copied()
        .unwrap_or_default()
}

#[derive(Debug, Default)]
struct Stats {
    recv_p50: Duration,
    recv_p99: Duration,
    ack_p50: Duration,
    ack_p99: Duration,
    ack_max: Duration,
    /// Mean over rounds of the time until every stream had ACKed.
    all_acked: Duration,
}

/// Pools the per-stream samples of every round; `all_acked` is the mean of the rounds' maxima.
fn stats(rounds: &[Vec<(Duration, Duration)>]) -> Stats {
    let mut recv: Vec<Duration> = rounds.iter().flatten().map(|s| s.0).collect();
    let mut ack: Vec<Duration> = rounds.iter().flatten().map(|s| s.1).collect();
    recv.sort_unstable();
    ack.sort_unstable();
    let maxima: Vec<Duration> = rounds
        .iter()
        .map(|r| r.iter().map(|s| s.1).max().unwrap_or_default())
        .collect();
    let all_acked =
        maxima.iter().sum::<Duration>() / u32::try_from(maxima.len().max(1)).unwrap_or(1);
    Stats {
        recv_p50: pct(&recv, 50.0),
        recv_p99: pct(&recv, 99.0),
        ack_p50: pct(&ack, 50.0),
        ack_p99: pct(&ack, 99.0),
        ack_max: ack.last().copied().unwrap_or_default(),
        all_acked,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

async fn run(args: Args) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pilot_args: &[&str] = if args.pods {
        &[]
    } else {
        &["--trust-workload-claims"]
    };
    let plane = ControlPlane::start(dir, pilot_args)?;
    let pid = plane.pilot.pid();
    let (rss_start, _) = memory(pid)?;

    eprintln!("applying {} Services ...", args.services);
    let t = Instant::now();
    apply(&plane, dir, "services.yaml", &initial_config(args.services))?;
    if args.pods {
        // In batches, as pods start (weft-local registers each pod as it starts it): one apply of
        // every Pod at once would measure the allocator's memory of that one large parse.
        for (batch, first) in (0..args.streams).step_by(POD_BATCH).enumerate() {
            let last = (first + POD_BATCH).min(args.streams);
            apply(
                &plane,
                dir,
                &format!("pods-{batch}.yaml"),
                &pods_config(first..last),
            )?;
        }
    }
    eprintln!("  applied in {:.1} s", t.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tls = client_configs(&plane).await?;

    // Baseline: the same change, one stream (pod 0, which later reconnects as one of the many,
    // with the same registration, so the registry does not change when this stream goes).
    eprintln!("baseline: 1 stream, {} rounds ...", args.rounds);
    let (mut events, tasks) = connect(&plane, &tls, 1)?;
    settle(&mut events, 1).await?;
    let mut solo = Vec::new();
    for r in 1..=args.rounds {
        solo.push(round(&plane, dir, &mut events, 1, r).await?);
    }
    let (rss_no_streams, _) = memory(pid)?;
    for task in tasks {
        task.abort();
    }
    drop(events);

    eprintln!("connecting {} streams ...", args.streams);
    let t = Instant::now();
    let (mut events, tasks) = connect(&plane, &tls, args.streams)?;
    let (startup_pushes, retries) = settle(&mut events, args.streams).await?;
    let connect_time = t.elapsed();
    eprintln!(
        "  settled in {:.1} s ({startup_pushes} pushes while connecting, {retries} connection retries)",
        connect_time.as_secs_f64()
    );
    let (rss_connected, _) = memory(pid)?;
    let mut many = Vec::new();
    for r in 1..=args.rounds {
        let n = args.rounds + r;
        let samples = round(&plane, dir, &mut events, args.streams, n).await?;
        let s = stats(std::slice::from_ref(&samples));
        eprintln!(
            "  round {r}: ACK p50 {} p99 {} all {}",
            ms(s.ack_p50),
            ms(s.ack_p99),
            ms(s.ack_max)
        );
        many.push(samples);
    }
    let (rss_end, hwm) = memory(pid)?;
    for task in tasks {
        task.abort();
    }

    let b = stats(&solo);
    let m = stats(&many);
    let n = args.streams;
    println!(
        "# pilot push: one VirtualService change, {} Services, {n} streams vs 1 stream ({} rounds each)",
        args.services, args.rounds
    );
    println!();
    println!("| measure | baseline: 1 stream | {n} streams | ratio | goal |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, base: Duration, many: Duration, goal: &str| {
        println!(
            "| {name} | {} | {} | {} | {goal} |",
            ms(base),
            ms(many),
            ratio(many.as_secs_f64(), base.as_secs_f64())
        );
    };
    row("push received, p50", b.recv_p50, m.recv_p50, "");
    row("push received, p99", b.recv_p99, m.recv_p99, "");
    row("ACK sent, p50", b.ack_p50, m.ack_p50, "");
    row(
        "ACK sent, p99",
        b.ack_p99,
        m.ack_p99,
        &format!("p99 <= 1 s: {}", met(m.ack_p99 <= Duration::from_secs(1))),
    );
    row("ACK sent, max", b.ack_max, m.ack_max, "");
    row(
        "every stream ACKed (mean of rounds)",
        b.all_acked,
        m.all_acked,
        "",
    );
    println!();
    println!("| pilot memory | MB | ratio to 0 streams | goal |");
    println!("|---|---|---|---|");
    println!(
        "| RSS at start (empty store) | {:.1} | {} | |",
        mb(rss_start),
        ratio(mb(rss_start), mb(rss_no_streams))
    );
    println!(
        "| baseline: RSS, {} Services, 0 streams | {:.1} | 1.00 | |",
        args.services,
        mb(rss_no_streams)
    );
    println!(
        "| RSS, {n} streams connected, settled | {:.1} | {} | |",
        mb(rss_connected),
        ratio(mb(rss_connected), mb(rss_no_streams))
    );
    println!(
        "| RSS at the end | {:.1} | {} | |",
        mb(rss_end),
        ratio(mb(rss_end), mb(rss_no_streams))
    );
    println!(
        "| peak RSS (VmHWM), whole run | {:.1} | {} | <= 100 MB: {} |",
        mb(hwm),
        ratio(mb(hwm), mb(rss_no_streams)),
        met(hwm <= 100 * 1024 * 1024)
    );
    println!();
    println!(
        "Latencies run from `pilot apply` returning to the stream receiving the push (and sending its ACK); \
         they include pilot's {DEBOUNCE} debounce. {n} streams connected and settled in {:.1} s \
         ({startup_pushes} pushes, {retries} connection attempts retried). The simulated sidecars run in this process on the same cores as pilot.",
        connect_time.as_secs_f64()
    );
    Ok(())
}
